#include "flags.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace dysco::client {

bool ParseInt64(const std::string& text, int64_t* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end != text.c_str() + text.size()) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

bool ParseDouble(const std::string& text, double* out) {
  if (text.empty()) return false;
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || end != text.c_str() + text.size() || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::Declare(const std::string& name, Kind kind, const std::string& help,
                      const std::string& default_value) {
  Flag flag;
  flag.kind = kind;
  flag.help = help;
  flag.value = default_value;
  if (flags_.emplace(name, std::move(flag)).second) order_.push_back(name);
}

void FlagSet::String(const std::string& name, const std::string& help,
                     const std::string& default_value) {
  Declare(name, Kind::kString, help, default_value);
}
void FlagSet::Int(const std::string& name, const std::string& help, int64_t default_value) {
  Declare(name, Kind::kInt, help, std::to_string(default_value));
}
void FlagSet::Double(const std::string& name, const std::string& help, double default_value) {
  std::ostringstream text;
  text << default_value;
  Declare(name, Kind::kDouble, help, text.str());
}
void FlagSet::OptionalInt(const std::string& name, const std::string& help) {
  Declare(name, Kind::kInt, help, "0");
  flags_.at(name).show_default = false;
}
void FlagSet::OptionalDouble(const std::string& name, const std::string& help) {
  Declare(name, Kind::kDouble, help, "0");
  flags_.at(name).show_default = false;
}
void FlagSet::Bool(const std::string& name, const std::string& help) {
  Declare(name, Kind::kBool, help, "false");
}
void FlagSet::List(const std::string& name, const std::string& help) {
  Declare(name, Kind::kList, help, "");
}

std::string FlagSet::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& word = args[i];
    if (word == "--help" || word == "-h") {
      help_requested_ = true;
      return "";
    }
    if (word.size() < 3 || word.compare(0, 2, "--") != 0) {
      return "unexpected argument '" + word + "' (flags are --name value)";
    }
    std::string name = word.substr(2);
    std::string value;
    bool has_inline_value = false;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline_value = true;
    }
    auto it = flags_.find(name);
    if (it == flags_.end())
      return "unknown flag --" + name + " for '" + command_ + "' (see --help)";
    Flag& flag = it->second;
    if (flag.kind == Kind::kBool) {
      if (!has_inline_value) value = "true";
      if (value != "true" && value != "false" && value != "1" && value != "0") {
        return "--" + name + " takes true or false, got '" + value + "'";
      }
      flag.value = (value == "true" || value == "1") ? "true" : "false";
      flag.given = true;
      continue;
    }
    if (!has_inline_value) {
      if (i + 1 >= args.size()) return "--" + name + " needs a value";
      value = args[++i];
    }
    if (flag.kind == Kind::kInt) {
      int64_t v;
      if (!ParseInt64(value, &v)) return "--" + name + " must be an integer, got '" + value + "'";
    } else if (flag.kind == Kind::kDouble) {
      double v;
      if (!ParseDouble(value, &v)) return "--" + name + " must be a number, got '" + value + "'";
    }
    if (flag.kind == Kind::kList) {
      flag.values.push_back(value);
    } else {
      flag.value = value;
    }
    flag.given = true;
  }
  return "";
}

const FlagSet::Flag& FlagSet::Lookup(const std::string& name, Kind kind) const {
  auto it = flags_.find(name);
  if (it == flags_.end() || it->second.kind != kind) {
    std::fprintf(stderr, "dysco-client: internal error: flag --%s not declared with this type\n",
                 name.c_str());
    std::abort();
  }
  return it->second;
}

bool FlagSet::Has(const std::string& name) const {
  auto it = flags_.find(name);
  return it != flags_.end() && it->second.given;
}
const std::string& FlagSet::GetString(const std::string& name) const {
  return Lookup(name, Kind::kString).value;
}
int64_t FlagSet::GetInt(const std::string& name) const {
  int64_t v = 0;
  ParseInt64(Lookup(name, Kind::kInt).value, &v);
  return v;
}
double FlagSet::GetDouble(const std::string& name) const {
  double v = 0;
  ParseDouble(Lookup(name, Kind::kDouble).value, &v);
  return v;
}
bool FlagSet::GetBool(const std::string& name) const {
  return Lookup(name, Kind::kBool).value == "true";
}
const std::vector<std::string>& FlagSet::GetList(const std::string& name) const {
  return Lookup(name, Kind::kList).values;
}

std::string FlagSet::Usage() const {
  std::ostringstream out;
  out << "usage: dysco-client " << command_ << " [flags]\n" << summary_ << "\n\nflags:\n";
  for (const std::string& name : order_) {
    const Flag& flag = flags_.at(name);
    std::string left = "  --" + name;
    switch (flag.kind) {
      case Kind::kString:
        left += " TEXT";
        break;
      case Kind::kInt:
        left += " N";
        break;
      case Kind::kDouble:
        left += " X";
        break;
      case Kind::kList:
        left += " TEXT (repeatable)";
        break;
      case Kind::kBool:
        break;
    }
    out << left;
    if (left.size() < 34)
      out << std::string(34 - left.size(), ' ');
    else
      out << "\n" << std::string(34, ' ');
    out << flag.help;
    if (flag.show_default && flag.kind != Kind::kBool && flag.kind != Kind::kList &&
        !flag.value.empty()) {
      out << " (default " << flag.value << ")";
    }
    out << "\n";
  }
  return out.str();
}

}  // namespace dysco::client
