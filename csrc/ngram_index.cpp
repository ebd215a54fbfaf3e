// NgramIndex: see ngram_index.h for the exact semantics; the Python reference is
// specdec/drafters/ngram_index.py (NgramIndexRef).
#include "ngram_index.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace specdec {

namespace {

// a[0:na] is a prefix of (or equal to) b[0:nb]
bool is_prefix(const int64_t* a, size_t na, const int64_t* b, size_t nb) {
  return na <= nb && std::equal(a, a + na, b);
}

void check_positive(const char* name, int64_t v) {
  if (v < 1) throw std::invalid_argument(std::string("NgramIndex: ") + name + " must be >= 1, got " + std::to_string(v));
}

}  // namespace

size_t NgramIndex::KeyHash::operator()(const Tokens& k) const noexcept {
  uint64_t h = 0xcbf29ce484222325ULL ^ k.size();
  for (int64_t t : k) {  // 64-bit mix per token (splitmix64 finalizer)
    uint64_t x = static_cast<uint64_t>(t) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    h ^= x ^ (x >> 31);
  }
  return static_cast<size_t>(h);
}

NgramIndex::NgramIndex(int64_t max_order, int64_t max_continuation, int64_t capacity, int64_t max_per_key)
    : max_order_(max_order), max_continuation_(max_continuation), capacity_(capacity), max_per_key_(max_per_key) {
  check_positive("max_order", max_order);
  check_positive("max_continuation", max_continuation);
  check_positive("capacity", capacity);
  check_positive("max_per_key", max_per_key);
}

void NgramIndex::clear() {
  map_.clear();
  lru_.clear();
}

void NgramIndex::drop(EntryIt e) {
  auto it = map_.find(e->key);
  auto& items = it->second;
  items.erase(std::find(items.begin(), items.end(), e));
  if (items.empty()) map_.erase(it);
  lru_.erase(e);
}

void NgramIndex::record(const int64_t* key, int64_t n, const int64_t* cont, int64_t m) {
  Tokens k(key, key + n);
  auto& items = map_[k];
  // 1. an entry that starts with cont: touch it (most recent such first).
  for (size_t i = 0; i < items.size(); ++i) {
    const Tokens& e = items[i]->cont;
    if (is_prefix(cont, m, e.data(), e.size())) {
      EntryIt hit = items[i];
      std::rotate(items.begin(), items.begin() + i, items.begin() + i + 1);
      lru_.splice(lru_.end(), lru_, hit);
      return;
    }
  }
  // 2. an entry that cont extends: replace it.
  for (size_t i = 0; i < items.size(); ++i) {
    const Tokens& e = items[i]->cont;
    if (is_prefix(e.data(), e.size(), cont, m)) {
      lru_.erase(items[i]);
      items.erase(items.begin() + i);
      break;
    }
  }
  // 3. add as the most recent; per-key cap, then the global LRU cap.
  lru_.push_back(Entry{std::move(k), Tokens(cont, cont + m)});
  items.insert(items.begin(), std::prev(lru_.end()));
  if (static_cast<int64_t>(items.size()) > max_per_key_) {
    lru_.erase(items.back());
    items.pop_back();
  }
  while (static_cast<int64_t>(lru_.size()) > capacity_) drop(lru_.begin());  // never the new entry: capacity >= 1
}

void NgramIndex::insert(const Tokens& tokens, int64_t start) {
  if (start < 0) throw std::invalid_argument("NgramIndex.insert: start must be >= 0, got " + std::to_string(start));
  const int64_t len = static_cast<int64_t>(tokens.size());
  const int64_t* t = tokens.data();
  for (int64_t e = std::max<int64_t>(start, 1); e < len; ++e) {
    const int64_t m = std::min(max_continuation_, len - e);
    for (int64_t n = 1; n <= std::min(max_order_, e); ++n) record(t + e - n, n, t + e, m);
  }
}

void NgramIndex::insert_next(const Tokens& context, const Tokens& next_tokens) {
  const int64_t len = static_cast<int64_t>(context.size());
  const int64_t* end = context.data() + len;
  for (int64_t n = 1; n <= std::min(max_order_, len); ++n) {
    for (auto it = next_tokens.rbegin(); it != next_tokens.rend(); ++it) record(end - n, n, &*it, 1);
  }
}

std::vector<NgramIndex::Tokens> NgramIndex::lookup(const Tokens& context, int64_t max_candidates) const {
  if (max_candidates < 0) {
    throw std::invalid_argument("NgramIndex.lookup: max_candidates must be >= 0, got " + std::to_string(max_candidates));
  }
  std::vector<Tokens> out;
  const int64_t len = static_cast<int64_t>(context.size());
  Tokens k;
  for (int64_t n = std::min(max_order_, len); n >= 1 && static_cast<int64_t>(out.size()) < max_candidates; --n) {
    k.assign(context.end() - n, context.end());
    auto it = map_.find(k);
    if (it == map_.end()) continue;
    for (const EntryIt& e : it->second) {
      const Tokens& c = e->cont;
      bool seen = std::any_of(out.begin(), out.end(), [&](const Tokens& o) {
        return is_prefix(c.data(), c.size(), o.data(), o.size());
      });
      if (seen) continue;
      out.push_back(c);
      if (static_cast<int64_t>(out.size()) >= max_candidates) break;
    }
  }
  return out;
}

std::vector<NgramIndex::Tokens> NgramIndex::continuations(const Tokens& key) const {
  std::vector<Tokens> out;
  auto it = map_.find(key);
  if (it != map_.end()) {
    for (const EntryIt& e : it->second) out.push_back(e->cont);
  }
  return out;
}

}  // namespace specdec
