#include "core/dysco/trace.h"

#include <nlohmann/json.hpp>

namespace dysco {

std::string DyscoTraceRecordToJson(const DyscoTraceRecord& r) {
  nlohmann::ordered_json j;
  j["step"] = r.step;
  j["phase"] = DyscoPhaseName(r.phase);
  j["position"] = r.position;
  j["token"] = r.token;
  j["num_keys"] = r.num_keys;
  j["num_selected"] = r.num_selected;
  j["nucleus_mass"] = r.nucleus_mass;
  j["selected"] = nlohmann::ordered_json::array();
  for (const auto& [start, end] : r.selected) j["selected"].push_back({start, end});
  j["top_relevance"] = nlohmann::ordered_json::array();
  for (const auto& [pos, value] : r.top_relevance) {
    j["top_relevance"].push_back({pos, static_cast<double>(value)});
  }
  j["next_token"] = r.next_token ? nlohmann::ordered_json(*r.next_token) : nullptr;
  if (!r.relevance.empty()) {
    auto& rel = j["relevance"] = nlohmann::ordered_json::array();
    for (float v : r.relevance) rel.push_back(static_cast<double>(v));
  }
  return j.dump();
}

}  // namespace dysco
