#!/usr/bin/env bash
# The domain core (common, core, cache, oauth) includes no gRPC, protobuf, Boost, Beast,
# OpenSSL or spdlog header (STYLE.md, layering rule). common/secret_format.h and
# common/logging.* are the adapters' helpers and are exempt by name.
set -euo pipefail
root=${1:?usage: check_layering.sh REPO_ROOT}
bad=$(grep -rnE '#include [<"](grpc|grpcpp|google/protobuf|boost|openssl|spdlog|fmt|yaml-cpp)' \
  "$root"/server/src/{common,core,cache,oauth,auth} \
  | grep -vE 'common/(secret_format\.h|logging\.cc|secret\.cc):' || true)
if [[ -n $bad ]]; then
  echo "layering: the domain core must not include adapter headers:"
  echo "$bad"
  exit 1
fi
echo "layering: domain core is free of gRPC, Boost, OpenSSL and spdlog headers"
