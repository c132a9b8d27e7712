#include "server/src/core/provider_spec.h"

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace tb::core {

std::shared_ptr<const ProviderSpec> ProviderDirectory::Find(const std::string& name) const {
  std::shared_ptr<const ProviderRegistry> all = Snapshot();
  const auto it = all->find(name);
  if (it == all->end()) {
    return nullptr;
  }
  return std::shared_ptr<const ProviderSpec>(std::move(all), &it->second);  // shares ownership
}

std::vector<std::string> ProviderDirectory::Replace(ProviderRegistry next) {
  auto fresh = std::make_shared<const ProviderRegistry>(std::move(next));
  std::shared_ptr<const ProviderRegistry> old;
  {
    MutexLock lock(&mu_);
    old = std::exchange(current_, fresh);
  }
  std::vector<std::string> changed;
  for (const auto& [name, spec] : *fresh) {
    const auto it = old->find(name);
    if (it == old->end() || !(it->second == spec)) {
      changed.push_back(name);
    }
  }
  for (const auto& [name, spec] : *old) {
    if (!fresh->contains(name)) {
      changed.push_back(name);
    }
  }
  std::sort(changed.begin(), changed.end());
  return changed;
}

void ProviderDirectory::Put(const std::string& name, ProviderSpec spec) {
  MutexLock lock(&mu_);
  auto next = std::make_shared<ProviderRegistry>(*current_);
  (*next)[name] = std::move(spec);
  current_ = std::move(next);
}

absl::Status ValidateSubdomain(absl::string_view s) {
  const auto ok_char = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
  };
  if (s.empty() || s.size() > 63 || s.front() == '-' || !std::all_of(s.begin(), s.end(), ok_char)) {
    return absl::InvalidArgumentError(
        "subdomain must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-' "
        "(the part before .zendesk.com)");
  }
  return absl::OkStatus();
}

absl::Status ValidateConnectionParams(const ProviderSpec& spec,
                                      const std::map<std::string, std::string>& params) {
  for (const std::string& name : spec.required_params) {
    if (!params.contains(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("provider '", spec.name, "' needs parameter '", name, "'"));
    }
  }
  for (const auto& [name, value] : params) {
    if (std::find(spec.required_params.begin(), spec.required_params.end(), name) ==
        spec.required_params.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("provider '", spec.name, "' takes no parameter '", name, "'"));
    }
    if (name == "subdomain") {
      if (absl::Status s = ValidateSubdomain(value); !s.ok()) {
        return s;
      }
      continue;
    }
    if (value.empty() || value.size() > 256 ||
        !std::all_of(value.begin(), value.end(), [](char c) { return c > 0x20 && c < 0x7f; })) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter '", name, "' must be 1 to 256 printable ASCII characters without spaces"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ExpandUrl(absl::string_view tmpl,
                                      const std::map<std::string, std::string>& params,
                                      const std::map<std::string, std::string>& extra) {
  std::string out;
  size_t pos = 0;
  while (pos < tmpl.size()) {
    const size_t open = tmpl.find('{', pos);
    if (open == absl::string_view::npos) {
      absl::StrAppend(&out, tmpl.substr(pos));
      break;
    }
    const size_t close = tmpl.find('}', open);
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("unterminated '{' in URL '", tmpl, "'"));
    }
    absl::StrAppend(&out, tmpl.substr(pos, open - pos));
    const std::string name(tmpl.substr(open + 1, close - open - 1));
    auto it = params.find(name);
    if (it == params.end()) {
      it = extra.find(name);
      if (it == extra.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("URL '", tmpl, "' needs parameter '", name, "'"));
      }
    }
    absl::StrAppend(&out, it->second);
    pos = close + 1;
  }
  return out;
}

}  // namespace tb::core
