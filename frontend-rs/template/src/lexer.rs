//! Template source -> tokens, with jinja2's whitespace rules as shoal configures them:
//! `trim_blocks=True`, `lstrip_blocks=True`, `keep_trailing_newline=False`, and the
//! `-`/`+` whitespace-control signs on tags.

/// One lexical token; `line` (1-based) travels alongside in [`Spanned`].
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// Literal template text, already whitespace-processed.
    Text(String),
    BlockBegin,
    BlockEnd,
    VarBegin,
    VarEnd,
    Name(String),
    Str(String),
    Int(i64),
    Float(f64),
    /// An operator or punctuation, spelled as in the source (`==`, `(`, `|`, ...).
    Op(&'static str),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub tok: Tok,
    pub line: usize,
}

// Longest first, so that `//` wins over `/`.
const OPERATORS: &[&str] = &[
    "//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]", "(", ")", "{", "}",
    ">", "<", "=", ".", ":", "|", ",", ";",
];

/// Python's `str.isspace` (what jinja2's `\s` and `str.rstrip()` use): Unicode White_Space
/// plus the ASCII information separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// jinja2's newline handling before lexing: `\r\n`, `\r` and `\n` all become `\n`, and one
/// trailing newline of the source is dropped (keep_trailing_newline=False).
fn normalize_source(source: &str) -> String {
    let mut s = source.replace("\r\n", "\n").replace('\r', "\n");
    if s.ends_with('\n') {
        s.pop();
    }
    s
}

#[derive(Clone, Copy, PartialEq)]
enum TagKind {
    Block,
    Var,
    Comment,
}

pub fn tokenize(source: &str) -> Result<Vec<Spanned>, String> {
    Lexer {
        src: normalize_source(source),
        pos: 0,
        line: 1,
        out: Vec::new(),
    }
    .run()
}

struct Lexer {
    src: String,
    pos: usize,
    line: usize,
    out: Vec<Spanned>,
}

impl Lexer {
    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn push(&mut self, tok: Tok) {
        self.out.push(Spanned {
            tok,
            line: self.line,
        });
    }

    /// Moves past `n` bytes, counting the newlines crossed.
    fn advance(&mut self, n: usize) {
        self.line += self.src[self.pos..self.pos + n].matches('\n').count();
        self.pos += n;
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("line {}: {}", self.line, what))
    }

    fn run(mut self) -> Result<Vec<Spanned>, String> {
        // Whether the previous match ended a line (jinja2's `line_starting`): decides
        // lstrip_blocks for a tag on the template's first line or right after a trimmed tag.
        let mut line_starting = true;
        loop {
            let rest = self.rest();
            let found = ["{{", "{%", "{#"]
                .iter()
                .filter_map(|open| rest.find(open))
                .min();
            let Some(at) = found else {
                let text = rest.to_string();
                if !text.is_empty() {
                    self.push(Tok::Text(text));
                }
                return Ok(self.out);
            };
            let kind = match &rest[at..at + 2] {
                "{{" => TagKind::Var,
                "{%" => TagKind::Block,
                _ => TagKind::Comment,
            };
            let sign = rest[at + 2..]
                .chars()
                .next()
                .filter(|c| *c == '-' || *c == '+');
            let mut text = &rest[..at];
            if sign == Some('-') {
                text = text.trim_end_matches(is_py_space);
            } else if sign != Some('+') && kind != TagKind::Var {
                // lstrip_blocks: spaces between a line's start and a block or comment tag go.
                let l_pos = text.rfind('\n').map_or(0, |i| i + 1);
                let tail = &text[l_pos..];
                if (l_pos > 0 || line_starting) && !tail.is_empty() && tail.chars().all(is_py_space)
                {
                    text = &text[..l_pos];
                }
            }
            if !text.is_empty() {
                let text = text.to_string();
                self.push(Tok::Text(text));
            }
            self.advance(at + 2 + sign.map_or(0, |_| 1));
            line_starting = match kind {
                TagKind::Comment => self.comment()?,
                TagKind::Block => {
                    if self.at_raw() {
                        return self.err(
                            "`{% raw %}` blocks are not supported by shoal's template subset",
                        );
                    }
                    self.push(Tok::BlockBegin);
                    self.tag(TagKind::Block)?
                }
                TagKind::Var => {
                    self.push(Tok::VarBegin);
                    self.tag(TagKind::Var)?
                }
            };
        }
    }

    fn at_raw(&self) -> bool {
        let r = self.rest().trim_start_matches(is_py_space);
        r.strip_prefix("raw").is_some_and(|after| {
            after.starts_with(|c: char| is_py_space(c) || c == '-' || c == '%')
        })
    }

    /// Skips a comment through its `#}`; returns whether what it consumed ends a line.
    fn comment(&mut self) -> Result<bool, String> {
        let Some(close) = self.rest().find("#}") else {
            return self.err("unclosed comment (missing `#}`)");
        };
        let sign = if close > 0 {
            self.rest()[..close].chars().last()
        } else {
            None
        };
        self.advance(close + 2);
        Ok(self.after_end(sign, true))
    }

    /// What follows a tag's end: `-` strips all whitespace, `+` nothing, a block or comment
    /// end (trim_blocks) one newline. Returns whether the match ended with a newline.
    fn after_end(&mut self, sign: Option<char>, trim_blocks: bool) -> bool {
        match sign {
            Some('-') => {
                let n = self.rest().len() - self.rest().trim_start_matches(is_py_space).len();
                let ends_line = self.rest()[..n].ends_with('\n');
                self.advance(n);
                ends_line
            }
            Some('+') => false,
            _ if trim_blocks && self.rest().starts_with('\n') => {
                self.advance(1);
                true
            }
            _ => false,
        }
    }

    /// Tokens of a `{% %}` or `{{ }}` tag through its end.
    fn tag(&mut self, kind: TagKind) -> Result<bool, String> {
        // Brackets open inside the tag: `}}` closing a dict literal is not the tag's end.
        let mut depth = 0usize;
        loop {
            let ws = self.rest().len() - self.rest().trim_start_matches(is_py_space).len();
            self.advance(ws);
            let rest = self.rest();
            if rest.is_empty() {
                return self.err("unexpected end of template inside a tag (missing `%}` or `}}`)");
            }
            if depth == 0 {
                let (close, end_tok) = match kind {
                    TagKind::Block => ("%}", Tok::BlockEnd),
                    _ => ("}}", Tok::VarEnd),
                };
                for sign in ["-", "+", ""] {
                    if sign == "+" && kind == TagKind::Var {
                        continue;
                    }
                    if rest.starts_with(sign) && rest[sign.len()..].starts_with(close) {
                        self.push(end_tok);
                        self.advance(sign.len() + 2);
                        return Ok(self.after_end(sign.chars().next(), kind == TagKind::Block));
                    }
                }
            }
            let c = rest.chars().next().unwrap_or(' ');
            if c == '\'' || c == '"' {
                let (value, len) = self.string_literal(c)?;
                self.push(Tok::Str(value));
                self.advance(len);
            } else if c.is_ascii_digit() {
                let (tok, len) = self.number()?;
                self.push(tok);
                self.advance(len);
            } else if c == '_' || c.is_alphabetic() {
                let len = rest
                    .find(|ch: char| !(ch == '_' || ch.is_alphanumeric()))
                    .unwrap_or(rest.len());
                let name = rest[..len].to_string();
                self.push(Tok::Name(name));
                self.advance(len);
            } else if let Some(op) = OPERATORS.iter().find(|op| rest.starts_with(**op)) {
                match *op {
                    "(" | "[" | "{" => depth += 1,
                    ")" | "]" | "}" => {
                        if depth == 0 {
                            return self.err(&format!("unexpected '{}'", op));
                        }
                        depth -= 1;
                    }
                    _ => {}
                }
                self.push(Tok::Op(op));
                self.advance(op.len());
            } else {
                return self.err(&format!("unexpected character {:?} in a tag", c));
            }
        }
    }

    /// An integer or float literal at the cursor (jinja2's forms, `_` separators included;
    /// binary/octal/hex integers too).
    fn number(&self) -> Result<(Tok, usize), String> {
        let rest = self.rest();
        let b = rest.as_bytes();
        let digits = |from: usize| {
            let mut i = from;
            while i < b.len() && (b[i].is_ascii_digit() || (b[i] == b'_' && i > from)) {
                i += 1;
            }
            i
        };
        if b.len() > 1 && b[0] == b'0' && matches!(b[1], b'b' | b'o' | b'x') {
            let radix = match b[1] {
                b'b' => 2,
                b'o' => 8,
                _ => 16,
            };
            let mut i = 2;
            while i < b.len() && (b[i] == b'_' || (b[i] as char).is_digit(radix)) {
                i += 1;
            }
            let text: String = rest[2..i].chars().filter(|c| *c != '_').collect();
            return match i64::from_str_radix(&text, radix) {
                Ok(v) => Ok((Tok::Int(v), i)),
                Err(_) => self.err(&format!("bad integer literal {:?}", &rest[..i])),
            };
        }
        let mut end = digits(0);
        let mut is_float = false;
        // A float needs digits after the dot (jinja2 reads `1.` as 1 then `.`); after a
        // `.` (as in `a.0.1`) a number is a subscript, never a float.
        let after_dot = self.pos > 0 && self.src.as_bytes()[self.pos - 1] == b'.';
        if !after_dot
            && end < b.len()
            && b[end] == b'.'
            && end + 1 < b.len()
            && b[end + 1].is_ascii_digit()
        {
            end = digits(end + 1);
            is_float = true;
        }
        if !after_dot && end < b.len() && (b[end] == b'e' || b[end] == b'E') {
            let mut j = end + 1;
            if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                j += 1;
            }
            if j < b.len() && b[j].is_ascii_digit() {
                end = digits(j);
                is_float = true;
            }
        }
        let text: String = rest[..end].chars().filter(|c| *c != '_').collect();
        if is_float {
            match text.parse::<f64>() {
                Ok(v) => Ok((Tok::Float(v), end)),
                Err(_) => self.err(&format!("bad float literal {:?}", &rest[..end])),
            }
        } else {
            match text.parse::<i64>() {
                Ok(v) => Ok((Tok::Int(v), end)),
                Err(_) => self.err(&format!(
                    "integer literal {:?} is out of range",
                    &rest[..end]
                )),
            }
        }
    }

    /// A quoted string at the cursor: its value (Python's escapes applied, as jinja2's
    /// `unicode-escape` decoding does) and its length in the source.
    fn string_literal(&self, quote: char) -> Result<(String, usize), String> {
        let rest = self.rest();
        let mut chars = rest.char_indices().skip(1).peekable();
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                return Ok((out, i + 1));
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some((_, e)) = chars.next() else { break };
            match e {
                '\n' => {}
                '\\' => out.push('\\'),
                '\'' => out.push('\''),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'a' => out.push('\x07'),
                'b' => out.push('\x08'),
                'f' => out.push('\x0c'),
                'v' => out.push('\x0b'),
                '0'..='7' => {
                    let mut v = e.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match chars.peek() {
                            Some((_, d)) if d.is_digit(8) => {
                                v = v * 8 + d.to_digit(8).unwrap_or(0);
                                chars.next();
                            }
                            _ => break,
                        }
                    }
                    out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                }
                'x' | 'u' | 'U' => {
                    let n = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let mut v = 0u32;
                    for _ in 0..n {
                        match chars.next() {
                            Some((_, d)) if d.is_ascii_hexdigit() => {
                                v = v * 16 + d.to_digit(16).unwrap_or(0)
                            }
                            _ => return self.err(&format!("truncated \\{} escape in a string", e)),
                        }
                    }
                    match char::from_u32(v) {
                        Some(ch) => out.push(ch),
                        None => return self.err(&format!("invalid \\{} escape in a string", e)),
                    }
                }
                'N' => {
                    return self
                        .err("\\N{...} escapes are not supported by shoal's template subset")
                }
                other => {
                    // Python keeps an unknown escape as written.
                    out.push('\\');
                    out.push(other);
                }
            }
        }
        self.err("unterminated string literal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(src: &str) -> Vec<String> {
        tokenize(src)
            .unwrap()
            .into_iter()
            .filter_map(|s| match s.tok {
                Tok::Text(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        assert_eq!(
            texts("a\n  {% if x %}\n  b\n  {% endif %}\nc\n"),
            ["a\n", "  b\n", "c"]
        );
        // Variables are not lstripped, and trim_blocks does not apply after `}}`.
        assert_eq!(texts("  {{ x }}\nb"), ["  ", "\nb"]);
    }

    #[test]
    fn whitespace_control_signs() {
        assert_eq!(texts("a  \n {%- if x -%}  \n b{%+ endif %}"), ["a", "b"]);
        assert_eq!(texts("a \n{{- x -}}\n b"), ["a", "b"]);
        assert_eq!(texts("a {#- c -#} b"), ["a", "b"]);
    }

    #[test]
    fn literals_and_operators() {
        let toks: Vec<Tok> = tokenize("{{ 'a\\n' ~ 1_000 // 2.5e1 }}")
            .unwrap()
            .into_iter()
            .map(|s| s.tok)
            .collect();
        assert_eq!(
            toks,
            [
                Tok::VarBegin,
                Tok::Str("a\n".into()),
                Tok::Op("~"),
                Tok::Int(1000),
                Tok::Op("//"),
                Tok::Float(25.0),
                Tok::VarEnd
            ]
        );
    }

    #[test]
    fn dict_literal_braces_are_not_the_tag_end() {
        let toks = tokenize("{{ {'a': {'b': 1}} }}").unwrap();
        assert_eq!(toks.last().unwrap().tok, Tok::VarEnd);
        assert_eq!(toks.iter().filter(|s| s.tok == Tok::Op("}")).count(), 2);
    }

    #[test]
    fn errors_name_the_line() {
        assert!(tokenize("a\n{{ x ").unwrap_err().starts_with("line 2:"));
        assert!(tokenize("{% raw %}x{% endraw %}")
            .unwrap_err()
            .contains("raw"));
    }
}
