#include "server/src/config/config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/src/common/status_macros.h"

namespace tb::config {

namespace {

// yaml-cpp reports errors by throwing; nothing here lets an exception out.
using FieldSetter = std::function<absl::Status(const YAML::Node&, const std::string& path)>;

absl::Status ReadString(const YAML::Node& node, const std::string& path, std::string* out) {
  if (!node.IsScalar()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a string"));
  }
  *out = node.Scalar();
  return absl::OkStatus();
}

absl::Status ReadInt(const YAML::Node& node, const std::string& path, int* out) {
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), out)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected an integer"));
  }
  return absl::OkStatus();
}

// Applies `fields` to the mapping `node`; any key not in `fields` is an error.
absl::Status ReadSection(const YAML::Node& node, const std::string& path,
                         const std::map<std::string, FieldSetter>& fields) {
  if (node.IsNull()) {
    return absl::OkStatus();
  }
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.empty() ? "top level" : path, ": expected a mapping"));
  }
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const std::string child = path.empty() ? key : absl::StrCat(path, ".", key);
    const auto it = fields.find(key);
    if (it == fields.end()) {
      std::vector<std::string> known;
      for (const auto& [name, setter] : fields) {
        known.push_back(name);
      }
      return absl::InvalidArgumentError(absl::StrCat("unknown key '", child,
                                                     "'; known keys here: ",
                                                     absl::StrJoin(known, ", ")));
    }
    TB_RETURN_IF_ERROR(it->second(kv.second, child));
  }
  return absl::OkStatus();
}

FieldSetter String(std::string* out) {
  return [out](const YAML::Node& n, const std::string& p) { return ReadString(n, p, out); };
}
FieldSetter Int(int* out) {
  return [out](const YAML::Node& n, const std::string& p) { return ReadInt(n, p, out); };
}
FieldSetter Section(std::map<std::string, FieldSetter> fields) {
  return [fields = std::move(fields)](const YAML::Node& n, const std::string& p) {
    return ReadSection(n, p, fields);
  };
}

absl::Status ParseInto(const YAML::Node& root, Config& c) {
  return ReadSection(
      root, "",
      {
          {"grpc", Section({{"listen", String(&c.grpc.listen)},
                            {"probe_listen", String(&c.grpc.probe_listen)},
                            {"threads", Int(&c.grpc.threads)}})},
          {"http", Section({{"public_listen", String(&c.http.public_listen)},
                            {"admin_listen", String(&c.http.admin_listen)},
                            {"threads", Int(&c.http.threads)}})},
          {"store", Section({{"url", String(&c.store.url)}})},
          {"log", Section({{"level", String(&c.log.level)}, {"format", String(&c.log.format)}})},
      });
}

}  // namespace

absl::StatusOr<HostPort> ParseHostPort(absl::string_view address) {
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", address, "' is not host:port (", why, ")"));
  };
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) {
    return bad("missing host or port");
  }
  HostPort hp;
  hp.host = std::string(address.substr(0, colon));
  if (hp.host.front() == '[') {
    if (hp.host.back() != ']') {
      return bad("unterminated IPv6 bracket");
    }
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  if (hp.host.empty()) {
    return bad("empty host");
  }
  if (!absl::SimpleAtoi(address.substr(colon + 1), &hp.port) || hp.port < 0 || hp.port > 65535) {
    return bad("port must be 0 to 65535");
  }
  return hp;
}

absl::Status Validate(const Config& c) {
  for (const auto& [name, value] :
       {std::pair<const char*, const std::string&>{"grpc.listen", c.grpc.listen},
        {"grpc.probe_listen", c.grpc.probe_listen},
        {"http.public_listen", c.http.public_listen},
        {"http.admin_listen", c.http.admin_listen}}) {
    if (absl::StatusOr<HostPort> hp = ParseHostPort(value); !hp.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": ", hp.status().message()));
    }
  }
  if (c.grpc.threads < 0 || c.grpc.threads > 256) {
    return absl::InvalidArgumentError("grpc.threads must be 0 (one per core) to 256");
  }
  if (c.http.threads < 1 || c.http.threads > 256) {
    return absl::InvalidArgumentError("http.threads must be 1 to 256");
  }
  if (c.store.url != "memory:") {
    return absl::InvalidArgumentError(
        absl::StrCat("store.url '", c.store.url, "' is not supported; use 'memory:'"));
  }
  static const char* const kLevels[] = {"trace", "debug", "info", "warn", "error", "critical",
                                        "off"};
  if (std::find(std::begin(kLevels), std::end(kLevels), c.log.level) == std::end(kLevels)) {
    return absl::InvalidArgumentError(
        absl::StrCat("log.level '", c.log.level, "' must be one of ", absl::StrJoin(kLevels, ", ")));
  }
  if (c.log.format != "text" && c.log.format != "json") {
    return absl::InvalidArgumentError("log.format must be text or json");
  }
  return absl::OkStatus();
}

absl::StatusOr<Config> ParseConfig(absl::string_view yaml) {
  Config c;
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    TB_RETURN_IF_ERROR(ParseInto(root, c));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config is not valid YAML: line ",
                                                   e.mark.line + 1, ", column ",
                                                   e.mark.column + 1, ": ", e.msg));
  }
  TB_RETURN_IF_ERROR(Validate(c));
  return c;
}

absl::StatusOr<Config> LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<Config> c = ParseConfig(buf.str());
  if (!c.ok()) {
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  }
  return c;
}

}  // namespace tb::config
