// A second process for sqlite_store_test: opens a SQLite store the way a broker would.
//
//   sqlite_store_probe <store-url> <key-file>          opens, closes, exits
//   sqlite_store_probe <store-url> <key-file> hold     opens, prints "ready", and keeps the
//                                                      store open until stdin closes
//
// Exits with the absl::StatusCode of the open (0 when it worked), or 100 on a usage or
// key-file error.

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "server/src/crypto/aes_gcm_cipher.h"
#include "server/src/crypto/key_ring.h"
#include "server/src/store/sqlite_store.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: sqlite_store_probe <store-url> <key-file> [hold]\n";
    return 100;
  }
  std::ifstream in(argv[2]);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  absl::StatusOr<tb::crypto::KeyRing> ring = tb::crypto::KeyRing::Parse(text, argv[2]);
  if (!ring.ok()) {
    std::cerr << ring.status() << "\n";
    return 100;
  }
  const tb::crypto::AesGcmCipher cipher(*std::move(ring));
  absl::StatusOr<std::unique_ptr<tb::store::SqliteStore>> store =
      tb::store::SqliteStore::Open(argv[1], cipher);
  if (!store.ok()) {
    std::cerr << store.status() << "\n";
    return static_cast<int>(store.status().code());
  }
  if (argc > 3 && std::string(argv[3]) == "hold") {
    std::cout << "ready" << std::endl;
    std::string line;
    while (std::getline(std::cin, line)) {
    }
  }
  return 0;
}
