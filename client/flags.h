// FlagSet: the command-line parser of one dysco-client subcommand ("--name value" or
// "--name=value").
//
// Each subcommand declares its flags with a help line and a default, then calls Parse once. Values
// are checked against their declared type at Parse time, so the typed getters never fail on a flag
// that was declared. Getters on an undeclared name abort (a programming error, not a user error).
// Thread-safety: none; one FlagSet per command invocation, used from the main thread.
// Ownership: the FlagSet owns copies of every value; nothing references argv after Parse returns.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dysco::client {

class FlagSet {
 public:
  FlagSet(std::string command, std::string summary);

  void String(const std::string& name, const std::string& help,
              const std::string& default_value = "");
  void Int(const std::string& name, const std::string& help, int64_t default_value = 0);
  void Double(const std::string& name, const std::string& help, double default_value = 0.0);
  // Numbers whose absence means "leave the field unset" (check Has); Usage shows no default.
  void OptionalInt(const std::string& name, const std::string& help);
  void OptionalDouble(const std::string& name, const std::string& help);
  // A switch: "--name" sets it, "--name=false" clears it.
  void Bool(const std::string& name, const std::string& help);
  // May be given several times; values accumulate in order.
  void List(const std::string& name, const std::string& help);

  // Parses args (the words after the subcommand). Returns "" on success, else a message naming the
  // flag.
  // "--help" / "-h" sets help_requested() and stops parsing.
  std::string Parse(const std::vector<std::string>& args);
  bool help_requested() const { return help_requested_; }

  // True when the flag was given on the command line (as opposed to holding its default).
  bool Has(const std::string& name) const;
  const std::string& GetString(const std::string& name) const;
  int64_t GetInt(const std::string& name) const;
  double GetDouble(const std::string& name) const;
  bool GetBool(const std::string& name) const;
  const std::vector<std::string>& GetList(const std::string& name) const;

  std::string Usage() const;

 private:
  enum class Kind { kString, kInt, kDouble, kBool, kList };
  struct Flag {
    Kind kind;
    std::string help;
    std::string value;                // current value as text (default until given)
    std::vector<std::string> values;  // kList only
    bool given = false;
    bool show_default = true;
  };
  void Declare(const std::string& name, Kind kind, const std::string& help,
               const std::string& default_value);
  const Flag& Lookup(const std::string& name, Kind kind) const;

  std::string command_;
  std::string summary_;
  std::map<std::string, Flag> flags_;
  std::vector<std::string> order_;  // declaration order, for Usage
  bool help_requested_ = false;
};

// Parses a whole decimal integer ("12", "-3"); false on anything else, including trailing
// characters.
bool ParseInt64(const std::string& text, int64_t* out);
// Parses a whole finite floating-point number; false on anything else.
bool ParseDouble(const std::string& text, double* out);

}  // namespace dysco::client
