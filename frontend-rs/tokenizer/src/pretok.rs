//! Pre-tokenization: splitting a piece of text into the words BPE merges within, as Hugging
//! Face `tokenizers` does for the pre-tokenizers shoal's models use.
//!
//! Pieces are byte ranges into one working `String`; a step that must change text (ByteLevel's
//! `add_prefix_space`) appends the new text to that buffer, so ranges never move.

use std::sync::OnceLock;

/// Character classes of GPT-2's split regex: `\p{L}`, `\p{N}`, `\s` (White_Space), other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Class {
    Other = 0,
    Letter = 1,
    Number = 2,
    Space = 3,
}

/// Two-level lookup table over all code points: 256-code-point blocks, shared when equal.
struct ClassTable {
    block_of: Vec<u16>,
    blocks: Vec<[u8; 256]>,
}

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(true)
        .build()
        .parse(pattern)
        .unwrap();
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(cls)) => cls
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("{pattern} is not a Unicode class: {other:?}"),
    }
}

/// Letters (1) and numbers (2) of Unicode 15-16 that regex-syntax's Unicode 14 tables lack
/// but Hugging Face's regex engine (Oniguruma) knows: measured by probing `tokenizers`
/// 0.23's ByteLevel pre-tokenizer on every code point.
#[rustfmt::skip]
const NEWER_UNICODE: &[(u32, u32, u8)] = &[
    (0x1C89, 0x1C8A, 1), (0xA7CB, 0xA7CD, 1), (0xA7DA, 0xA7DC, 1), (0x105C0, 0x105F3, 1),
    (0x10D40, 0x10D49, 2), (0x10D4A, 0x10D65, 1), (0x10D6F, 0x10D85, 1), (0x10EC2, 0x10EC4, 1),
    (0x1123F, 0x11240, 1), (0x11380, 0x11389, 1), (0x1138B, 0x1138B, 1), (0x1138E, 0x1138E, 1),
    (0x11390, 0x113B5, 1), (0x113B7, 0x113B7, 1), (0x113D1, 0x113D1, 1), (0x113D3, 0x113D3, 1),
    (0x116D0, 0x116E3, 2), (0x11BC0, 0x11BE0, 1), (0x11BF0, 0x11BF9, 2), (0x11F02, 0x11F02, 1),
    (0x11F04, 0x11F10, 1), (0x11F12, 0x11F33, 1), (0x11F50, 0x11F59, 2), (0x1342F, 0x1342F, 1),
    (0x13441, 0x13446, 1), (0x13460, 0x143FA, 1), (0x16100, 0x1611D, 1), (0x16130, 0x16139, 2),
    (0x16D40, 0x16D6C, 1), (0x16D70, 0x16D79, 2), (0x18CFF, 0x18CFF, 1), (0x1B132, 0x1B132, 1),
    (0x1B155, 0x1B155, 1), (0x1CCF0, 0x1CCF9, 2), (0x1D2C0, 0x1D2D3, 2), (0x1DF25, 0x1DF2A, 1),
    (0x1E030, 0x1E06D, 1), (0x1E4D0, 0x1E4EB, 1), (0x1E4F0, 0x1E4F9, 2), (0x1E5D0, 0x1E5ED, 1),
    (0x1E5F0, 0x1E5F0, 1), (0x1E5F1, 0x1E5FA, 2), (0x2B739, 0x2B739, 1), (0x2EBF0, 0x2EE5D, 1),
    (0x31350, 0x323AF, 1),
];

fn class_table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut flat = vec![Class::Other as u8; 0x110000];
        // Later classes win where sets overlap (they do not for L / N / White_Space).
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            for (lo, hi) in unicode_ranges(pattern) {
                for cp in lo..=hi {
                    flat[cp as usize] = class as u8;
                }
            }
        }
        for &(lo, hi, class) in NEWER_UNICODE {
            for cp in lo..=hi {
                flat[cp as usize] = class;
            }
        }
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let mut block_of = Vec::with_capacity(0x1100);
        for chunk in flat.chunks(256) {
            let block: [u8; 256] = chunk.try_into().unwrap();
            let n = *index.entry(block).or_insert_with(|| {
                blocks.push(block);
                blocks.len() - 1
            });
            block_of.push(n as u16);
        }
        ClassTable { block_of, blocks }
    })
}

/// `pattern` with `\p{L}` / `\p{N}` widened by `NEWER_UNICODE`, so that the regex crate's
/// Unicode 14 classes agree with Oniguruma's in Split patterns.
pub fn widen_unicode_classes(pattern: &str) -> String {
    let extra = |class: u8| -> String {
        NEWER_UNICODE
            .iter()
            .filter(|r| r.2 == class)
            .map(|&(lo, hi, _)| format!("\\x{{{lo:X}}}-\\x{{{hi:X}}}"))
            .collect()
    };
    let (letters, numbers) = (extra(1), extra(2));
    let mut out = String::with_capacity(pattern.len() + 1024);
    let mut depth = 0usize; // inside [...] (nested classes count)
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        let (name, widened) = if rest.starts_with("\\p{L}") {
            ("\\p{L}", &letters)
        } else if rest.starts_with("\\p{N}") {
            ("\\p{N}", &numbers)
        } else {
            if c == '\\' {
                // Copy an escape whole: `\[` is no class.
                let len = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..len]);
                rest = &rest[len..];
                continue;
            }
            match c {
                '[' => depth += 1,
                ']' if depth > 0 => depth -= 1,
                _ => {}
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        };
        if depth > 0 {
            out.push_str(name);
            out.push_str(widened);
        } else {
            out.push('[');
            out.push_str(name);
            out.push_str(widened);
            out.push(']');
        }
        rest = &rest[name.len()..];
    }
    out
}

#[inline]
pub fn class_of(c: char) -> Class {
    let cp = c as u32;
    if cp < 128 {
        let b = cp as u8;
        return if b.is_ascii_alphabetic() {
            Class::Letter
        } else if b.is_ascii_digit() {
            Class::Number
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
            Class::Space
        } else {
            Class::Other
        };
    }
    let t = class_table();
    let v = t.blocks[t.block_of[(cp >> 8) as usize] as usize][(cp & 0xff) as usize];
    match v {
        1 => Class::Letter,
        2 => Class::Number,
        3 => Class::Space,
        _ => Class::Other,
    }
}

/// Splits `s` as GPT-2's regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// does (leftmost-first alternation, every character lies in some match), pushing the match
/// ranges, offset by `base`, onto `out`.
pub fn gpt2_split(s: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let b = s.as_bytes();
    let n = b.len();
    let mut i = 0;
    // The class of the character at byte `j` and its length.
    let at = |j: usize| -> (Class, usize) {
        let c = s[j..].chars().next().unwrap();
        (class_of(c), c.len_utf8())
    };
    // End of the run of characters of `class` starting at `j`.
    let run = |mut j: usize, class: Class| -> usize {
        while j < n {
            let (c, len) = at(j);
            if c != class {
                break;
            }
            j += len;
        }
        j
    };
    while i < n {
        let start = i;
        let c0 = b[i];
        if c0 == b'\'' && i + 1 < n {
            let rest = &b[i + 1..];
            let len = match rest {
                [b's' | b't' | b'm' | b'd', ..] => 2,
                [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => 3,
                _ => 0,
            };
            if len > 0 {
                out.push((base + i, base + i + len));
                i += len;
                continue;
            }
        }
        let (class, len) = at(i);
        let end = if c0 == b' ' && i + 1 < n && at(i + 1).0 != Class::Space {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` with the space.
            let next = at(i + 1).0;
            run(i + 1, next)
        } else if class != Class::Space {
            run(i + len, class)
        } else {
            // `\s+(?!\S)` then `\s+`: a whitespace run gives back its last character when a
            // non-space follows, unless it is a single character.
            let mut last = i;
            let mut j = i;
            while j < n {
                let (c, l) = at(j);
                if c != Class::Space {
                    break;
                }
                last = j;
                j += l;
            }
            if j == n || last == i {
                j
            } else {
                last
            }
        };
        out.push((base + start, base + end));
        i = end;
    }
}

/// One pre-tokenization step before the byte-level mapping.
pub enum Step {
    /// `Digits`: every numeric character alone (`individual`), or numeric runs as one piece.
    Digits { individual: bool },
    /// `Split(pattern, behavior="isolated")`: matches and the text between them.
    Split { re: fancy_regex::Regex },
    /// `ByteLevel`'s own splitting: optional prefix space, then GPT-2's regex.
    ByteLevel {
        add_prefix_space: bool,
        use_regex: bool,
    },
}

impl Step {
    /// Splits the piece `buf[start..end]`, pushing the resulting ranges onto `out`.
    fn apply(&self, buf: &mut String, start: usize, end: usize, out: &mut Vec<(usize, usize)>) {
        match self {
            Step::Digits { individual } => {
                let s = &buf[start..end];
                let mut piece_start = 0;
                let mut in_digits = false;
                for (j, c) in s.char_indices() {
                    let digit = c.is_numeric();
                    // Isolated: each digit its own piece; contiguous: runs of digits.
                    let boundary = if *individual {
                        digit || in_digits
                    } else {
                        digit != in_digits
                    };
                    if boundary && j > piece_start {
                        out.push((start + piece_start, start + j));
                        piece_start = j;
                    }
                    in_digits = digit;
                }
                if piece_start < s.len() {
                    out.push((start + piece_start, end));
                }
            }
            Step::Split { re } => {
                let s = &buf[start..end];
                let mut last = 0;
                for m in re.find_iter(s) {
                    // A regex error (backtrack limit) leaves the rest as one piece.
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        out.push((start + last, start + m.start()));
                    }
                    if m.end() > m.start() {
                        out.push((start + m.start(), start + m.end()));
                    }
                    last = m.end();
                }
                if last < s.len() {
                    out.push((start + last, end));
                }
            }
            Step::ByteLevel {
                add_prefix_space,
                use_regex,
            } => {
                let (mut start, mut end) = (start, end);
                if *add_prefix_space && !buf[start..end].starts_with(' ') {
                    let new_start = buf.len();
                    buf.push(' ');
                    buf.extend_from_within(start..end);
                    start = new_start;
                    end = buf.len();
                }
                if *use_regex {
                    gpt2_split(&buf[start..end], start, out);
                } else if end > start {
                    out.push((start, end));
                }
            }
        }
    }
}

/// Runs `steps` over `buf[..]` (one piece), leaving the words in `pieces`; `scratch` is a
/// reusable buffer.
pub fn pre_tokenize(
    steps: &[Step],
    buf: &mut String,
    pieces: &mut Vec<(usize, usize)>,
    scratch: &mut Vec<(usize, usize)>,
) {
    pieces.clear();
    if !buf.is_empty() {
        pieces.push((0, buf.len()));
    }
    for step in steps {
        scratch.clear();
        for &(s, e) in pieces.iter() {
            step.apply(buf, s, e, scratch);
        }
        std::mem::swap(pieces, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        let mut out = Vec::new();
        gpt2_split(s, 0, &mut out);
        out.into_iter().map(|(a, b)| &s[a..b]).collect()
    }

    #[test]
    fn gpt2_regex_cases() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(
            split("I'm  here\n\nok "),
            ["I", "'m", " ", " here", "\n", "\n", "ok", " "]
        );
        assert_eq!(split("a   b"), ["a", "  ", " b"]);
        assert_eq!(split("x\n y"), ["x", "\n", " y"]);
        assert_eq!(split("''s"), ["''", "s"]);
        assert_eq!(split(" 123abc!!"), [" 123", "abc", "!!"]);
        assert_eq!(split("héllo 世界 ٣٤"), ["héllo", " 世界", " ٣٤"]);
        assert_eq!(split("\u{3000}\u{3000}x"), ["\u{3000}", "\u{3000}", "x"]);
        assert_eq!(split("\t\tx"), ["\t", "\t", "x"]);
        assert_eq!(split("'RE"), ["'", "RE"]);
    }

    #[test]
    fn widened_split_patterns_know_newer_letters() {
        let p = widen_unicode_classes(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|\[x");
        assert!(p.starts_with(r"[^\r\n\p{L}\x{1C89}-\x{1C8A}"), "{p}");
        let re = fancy_regex::Regex::new(&p).unwrap();
        let m = re.find("\u{134b1}\u{134b2}'").unwrap().unwrap();
        assert_eq!(m.as_str(), "\u{134b1}\u{134b2}");
        assert_eq!(re.find("[x").unwrap().unwrap().as_str(), "[x");
    }

    #[test]
    fn classes() {
        assert_eq!(class_of('é'), Class::Letter);
        assert_eq!(class_of('Ⅻ'), Class::Number);
        assert_eq!(class_of('\u{a0}'), Class::Space);
        assert_eq!(class_of('😀'), Class::Other);
        assert_eq!(class_of('\u{200d}'), Class::Other);
        assert_eq!(class_of('\u{134b1}'), Class::Letter); // Unicode 16 (NEWER_UNICODE)
        assert_eq!(class_of('\u{1e4f0}'), Class::Number);
    }

    #[test]
    fn digits_then_bytelevel() {
        let steps = [
            Step::Digits { individual: true },
            Step::ByteLevel {
                add_prefix_space: false,
                use_regex: true,
            },
        ];
        let mut buf = String::from("abc  123 x");
        let (mut pieces, mut scratch) = (Vec::new(), Vec::new());
        pre_tokenize(&steps, &mut buf, &mut pieces, &mut scratch);
        let words: Vec<&str> = pieces.iter().map(|&(a, b)| &buf[a..b]).collect();
        assert_eq!(words, ["abc", "  ", "1", "2", "3", " x"]);
    }

    #[test]
    fn prefix_space() {
        let steps = [Step::ByteLevel {
            add_prefix_space: true,
            use_regex: true,
        }];
        let mut buf = String::from("hi");
        let (mut pieces, mut scratch) = (Vec::new(), Vec::new());
        pre_tokenize(&steps, &mut buf, &mut pieces, &mut scratch);
        let words: Vec<&str> = pieces.iter().map(|&(a, b)| &buf[a..b]).collect();
        assert_eq!(words, [" hi"]);
    }
}
