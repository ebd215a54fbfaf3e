// NgramIndex: a bounded pool of n-gram -> continuation entries for n-gram drafting
// (prompt lookup, generated text, and the target's own top-k at verified nodes).
// Python reference with the same API and results: specdec/drafters/ngram_index.py.
//
// Semantics (the reference implements exactly these; tests compare the two):
//
// * key: an n-gram of token ids, 1 <= n <= max_order. continuation: the 1 to
//   max_continuation tokens that followed the key. An *entry* is one (key,
//   continuation) pair; the index holds at most `capacity` entries in all and at
//   most `max_per_key` entries per key.
// * recency: every entry has a last-touched time. Recording a continuation that
//   is already there (or is a prefix of one already there) touches that entry
//   instead of adding one, so continuations seen often stay recent. Within a key,
//   entries are ordered most recent first.
// * record(key, c), the one primitive every insert is made of:
//     1. if some entry of `key` starts with c (c is a prefix of it, or equal), touch
//        the most recent such entry and stop;
//     2. else, if some entry of `key` is a strict prefix of c (at most one can be),
//        remove it (c extends it: a text continuation that grew);
//     3. add (key, c) as the most recent entry; if `key` now has more than
//        max_per_key entries, drop its least recent; while the index holds more
//        than `capacity` entries, drop the least recent entry of all (LRU).
//   So the continuations of one key never contain one another as a prefix.
// * insert(tokens, start): for every position e in [max(start, 1), len(tokens)),
//   in increasing e, and for n = 1 .. min(max_order, e) in increasing n:
//   record(tokens[e-n : e], tokens[e : e + max_continuation]). I.e. every n-gram
//   whose continuation starts at e >= start. Calling it again on a grown sequence
//   with start = old_len - max_continuation + 1 (clamped at 0) extends the
//   continuations that were cut short by the old end.
// * insert_next(context, next_tokens): the target's next tokens after `context`
//   (best first). For n = 1 .. min(max_order, len(context)) in increasing n, and
//   for t in next_tokens from last to first: record(context[-n:], [t]). So the
//   best token ends up the most recent (and an existing longer continuation that
//   starts with t is touched, not shortened).
// * lookup(context, max_candidates): for n = min(max_order, len(context)) down to
//   1 (longest key first), the entries of key context[-n:] most recent first; a
//   continuation equal to or a prefix of one already returned is skipped; stops
//   after max_candidates. Read-only (does not touch recency).
//
// Cost: record and lookup hash the key (O(n)) and scan one key's entries
// (O(max_per_key * max_continuation)); nothing scans the whole pool or history.
#pragma once
#include <cstddef>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace specdec {

class NgramIndex {
 public:
  using Tokens = std::vector<int64_t>;

  NgramIndex(int64_t max_order, int64_t max_continuation, int64_t capacity, int64_t max_per_key);

  // tokens: [L] token ids; records the n-grams whose continuation starts at >= start.
  void insert(const Tokens& tokens, int64_t start);
  // context: [C] token ids (only the last max_order matter); next_tokens: [k], best first.
  void insert_next(const Tokens& context, const Tokens& next_tokens);
  // context: [C] -> at most max_candidates continuations, longest key first.
  std::vector<Tokens> lookup(const Tokens& context, int64_t max_candidates) const;
  // The continuations of one key, most recent first (empty if absent).
  std::vector<Tokens> continuations(const Tokens& key) const;

  int64_t size() const { return static_cast<int64_t>(lru_.size()); }
  int64_t num_keys() const { return static_cast<int64_t>(map_.size()); }
  void clear();

  int64_t max_order() const { return max_order_; }
  int64_t max_continuation() const { return max_continuation_; }
  int64_t capacity() const { return capacity_; }
  int64_t max_per_key() const { return max_per_key_; }

 private:
  struct Entry {
    Tokens key;
    Tokens cont;
  };
  using EntryIt = std::list<Entry>::iterator;
  struct KeyHash {
    size_t operator()(const Tokens& k) const noexcept;
  };

  void record(const int64_t* key, int64_t n, const int64_t* cont, int64_t m);
  void drop(EntryIt e);  // remove one entry from lru_ and its key's list

  int64_t max_order_, max_continuation_, capacity_, max_per_key_;
  std::list<Entry> lru_;  // least recent at the front
  std::unordered_map<Tokens, std::vector<EntryIt>, KeyHash> map_;  // key -> entries, most recent first
};

}  // namespace specdec
