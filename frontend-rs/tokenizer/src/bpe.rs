//! Byte-level BPE: the merges of Hugging Face's `models.BPE` over a word's bytes, with a rank
//! map and a bounded cache of merged words.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

/// FxHash (rustc's): fast for the small integer pairs and short byte strings hashed here;
/// SipHash's flooding resistance buys nothing for a vocabulary we load ourselves.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let mut tail = 0u64;
        for (k, &b) in chunks.remainder().iter().enumerate() {
            tail |= (b as u64) << (8 * k);
        }
        self.add(tail);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Words longer than this are not cached (as Hugging Face's MAX_LENGTH).
const CACHE_MAX_WORD: usize = 256;
const CACHE_CAPACITY: usize = 10_000;

/// GPT-2's byte -> printable character table (`bytes_to_unicode`).
pub fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    for b in 0..256u32 {
        let cp = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(cp).unwrap();
    }
    table
}

/// A word's bytes -> its token ids.
type WordCache = FxMap<Box<[u8]>, Box<[u32]>>;

pub struct Bpe {
    /// (left id, right id) -> (rank, merged id).
    merges: FxMap<(u32, u32), (u32, u32)>,
    /// Vocabulary id of each byte's character, None if the vocabulary lacks it.
    byte_ids: [Option<u32>; 256],
    /// Vocabulary id of the unknown token, for bytes whose character is missing.
    unk: Option<u32>,
    fuse_unk: bool,
    /// A word that is itself in the vocabulary is one token (Llama 3's tokenizer.json).
    ignore_merges: bool,
    byte_chars: [char; 256],
    /// Merged words; readers never wait on each other, and a contended lock just skips it.
    cache: RwLock<WordCache>,
}

#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: i32,
    next: i32,
    /// False once merged into its left neighbour.
    alive: bool,
}

impl Bpe {
    /// `merges` in rank order as token strings; `Err` names a merge whose parts or result are
    /// not in `vocab` (as Hugging Face refuses to load it).
    pub fn new(
        vocab: &FxMap<String, u32>,
        merges: &[(String, String)],
        unk_token: Option<&str>,
        fuse_unk: bool,
        ignore_merges: bool,
    ) -> Result<Bpe, String> {
        let mut map: FxMap<(u32, u32), (u32, u32)> = FxMap::default();
        map.reserve(merges.len());
        let mut joined = String::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            let missing =
                |t: &str| format!("tokenizer: merge token {t:?} is not in the vocabulary");
            let a_id = *vocab.get(a.as_str()).ok_or_else(|| missing(a))?;
            let b_id = *vocab.get(b.as_str()).ok_or_else(|| missing(b))?;
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let new_id = *vocab.get(joined.as_str()).ok_or_else(|| missing(&joined))?;
            // A repeated merge takes its last rank, as Hugging Face's map collection does.
            map.insert((a_id, b_id), (rank as u32, new_id));
        }
        let byte_chars = byte_chars();
        let mut byte_ids = [None; 256];
        let mut tmp = [0u8; 4];
        for b in 0..256 {
            byte_ids[b] = vocab.get(&*byte_chars[b].encode_utf8(&mut tmp)).copied();
        }
        let unk = unk_token.and_then(|u| vocab.get(u).copied());
        Ok(Bpe {
            merges: map,
            byte_ids,
            unk,
            fuse_unk,
            ignore_merges,
            byte_chars,
            cache: RwLock::new(FxMap::default()),
        })
    }

    /// Appends the token ids of one pre-tokenized word (its raw bytes) to `out`.
    pub fn tokenize(&self, word: &[u8], vocab: &FxMap<String, u32>, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if word.len() == 1 {
            if let Some(id) = self.byte_ids[word[0] as usize] {
                out.push(id);
                return;
            }
        }
        if self.ignore_merges {
            let mapped: String = word.iter().map(|&b| self.byte_chars[b as usize]).collect();
            if let Some(&id) = vocab.get(&mapped) {
                out.push(id);
                return;
            }
        }
        let cacheable = word.len() < CACHE_MAX_WORD;
        if cacheable {
            if let Ok(cache) = self.cache.try_read() {
                if let Some(ids) = cache.get(word) {
                    out.extend_from_slice(ids);
                    return;
                }
            }
        }
        let start = out.len();
        self.merge_word(word, out);
        if cacheable {
            if let Ok(mut cache) = self.cache.try_write() {
                if cache.len() < CACHE_CAPACITY {
                    cache.insert(word.into(), out[start..].into());
                }
            }
        }
    }

    /// Hugging Face's `Word::merge_all`: repeatedly apply the lowest-ranked merge among
    /// adjacent symbols, leftmost first on ties.
    fn merge_word(&self, word: &[u8], out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut unk_pending = false;
        for &b in word {
            match self.byte_ids[b as usize] {
                Some(id) => {
                    symbols.push(Symbol {
                        id,
                        prev: 0,
                        next: 0,
                        alive: true,
                    });
                    unk_pending = false;
                }
                None => {
                    // Without an unknown token the byte is dropped, as Hugging Face does.
                    if let Some(unk) = self.unk {
                        if !(self.fuse_unk && unk_pending) {
                            symbols.push(Symbol {
                                id: unk,
                                prev: 0,
                                next: 0,
                                alive: true,
                            });
                        }
                        unk_pending = true;
                    }
                }
            }
        }
        let n = symbols.len();
        for (k, s) in symbols.iter_mut().enumerate() {
            s.prev = k as i32 - 1;
            s.next = if k + 1 < n { k as i32 + 1 } else { -1 };
        }
        let mut heap: BinaryHeap<Reverse<(u32, u32, u32)>> = BinaryHeap::with_capacity(n);
        for k in 0..n.saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.merges.get(&(symbols[k].id, symbols[k + 1].id)) {
                heap.push(Reverse((rank, k as u32, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let pos = pos as usize;
            if !symbols[pos].alive || symbols[pos].next < 0 {
                continue;
            }
            let right = symbols[pos].next as usize;
            // An entry whose pair has changed since it was queued is stale.
            match self.merges.get(&(symbols[pos].id, symbols[right].id)) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            symbols[pos].id = new_id;
            symbols[right].alive = false;
            let after = symbols[right].next;
            symbols[pos].next = after;
            if after >= 0 {
                symbols[after as usize].prev = pos as i32;
            }
            let prev = symbols[pos].prev;
            if prev >= 0 {
                let pair = (symbols[prev as usize].id, new_id);
                if let Some(&(rank, id)) = self.merges.get(&pair) {
                    heap.push(Reverse((rank, prev as u32, id)));
                }
            }
            if after >= 0 {
                let pair = (new_id, symbols[after as usize].id);
                if let Some(&(rank, id)) = self.merges.get(&pair) {
                    heap.push(Reverse((rank, pos as u32, id)));
                }
            }
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> FxMap<String, u32> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect()
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = byte_chars();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xad], 'Ń'); // U+0143: the 68th non-printable byte
    }

    #[test]
    fn merges_by_rank_leftmost_first() {
        let v = vocab(&["a", "b", "c", "ab", "bc", "abc", "aa", "aaa"]);
        let merges: Vec<(String, String)> = [("b", "c"), ("a", "b"), ("a", "bc"), ("a", "a")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = Bpe::new(&v, &merges, None, false, false).unwrap();
        let enc = |w: &str| {
            let mut out = Vec::new();
            bpe.tokenize(w.as_bytes(), &v, &mut out);
            out
        };
        assert_eq!(enc("abc"), [5]); // b+c first (rank 0), then a+bc
        assert_eq!(enc("aaa"), [6, 0]); // leftmost pair first on equal rank
        assert_eq!(enc("abab"), [3, 3]);
        assert_eq!(enc("abc"), [5]); // from the cache
    }

    #[test]
    fn merge_out_of_vocab_is_an_error() {
        let v = vocab(&["a", "b"]);
        let merges = vec![("a".to_string(), "b".to_string())];
        assert!(Bpe::new(&v, &merges, None, false, false)
            .err()
            .unwrap()
            .contains("\"ab\""));
    }
}
