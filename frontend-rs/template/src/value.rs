//! Template values with Python's semantics where templates can see them: `str()`, `repr()`,
//! truthiness, equality and ordering, and `json.dumps` (shoal's `tojson`).

use std::cell::RefCell;
use std::fmt::Write;
use std::rc::Rc;

use crate::parser::MacroDef;

/// What an undefined value knows about how it came to be, for jinja2's error messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Missing {
    /// `'name' is undefined`
    Name(String),
    /// `'dict object' has no attribute 'x'`
    Attr(String, String),
    /// No hint (e.g. a ternary without `else`).
    Plain,
}

impl Missing {
    pub fn message(&self) -> String {
        match self {
            Missing::Name(n) => format!("'{}' is undefined", n),
            Missing::Attr(owner, a) => format!("'{}' has no attribute '{}'", owner, a),
            Missing::Plain => "value is undefined".into(),
        }
    }
}

/// A builtin callable that is a template global.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Builtin {
    RaiseException,
    StrftimeNow,
    Namespace,
    Range,
    Dict,
}

/// A macro as a value: its definition and the scopes it was defined in (jinja2 compiles a
/// macro to a closure: one defined inside a loop sees that loop's variables).
#[derive(Debug)]
pub struct MacroValue {
    pub def: std::sync::Arc<MacroDef>,
    /// The frames above the root at the definition, innermost last.
    pub closure: Vec<Vec<(String, Value)>>,
}

/// The `loop` variable of a for loop.
#[derive(Debug)]
pub struct LoopInfo {
    pub index0: usize,
    pub length: usize,
    pub prev: Option<Value>,
    pub next: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Value {
    Undefined(Rc<Missing>),
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    /// markupsafe's `Markup` (what `|safe` and `|escape` return): a string whose `+` with
    /// a plain string HTML-escapes the plain side, as Python's does even with autoescape
    /// off. Everywhere else it behaves as its text (see [`Value::plain`]).
    Markup(Rc<str>),
    List(Rc<Vec<Value>>),
    Tuple(Rc<Vec<Value>>),
    /// Insertion-ordered, string keys (what JSON and chat templates use).
    Dict(Rc<Vec<(String, Value)>>),
    Namespace(Rc<RefCell<Vec<(String, Value)>>>),
    Macro(Rc<MacroValue>),
    Builtin(Builtin),
    Loop(Rc<LoopInfo>),
    /// A one-shot iterator (what jinja2's map/select/unique/reverse/items filters return):
    /// iterating consumes it; it has no len() and no printable value.
    Gen(Rc<RefCell<Vec<Value>>>),
    /// A dict view (`dict_items`, `dict_keys`, `dict_values`): iterable and sized, printed
    /// as Python prints it, not subscriptable.
    View(&'static str, Rc<Vec<Value>>),
}

impl Value {
    pub fn str(s: &str) -> Value {
        Value::Str(Rc::from(s))
    }

    /// A one-shot iterator over `items`.
    pub fn gen(items: Vec<Value>) -> Value {
        Value::Gen(Rc::new(RefCell::new(items)))
    }

    /// A Markup value as the plain string it reads as; any other value as is.
    pub fn plain(&self) -> Value {
        match self {
            Value::Markup(s) => Value::Str(Rc::clone(s)),
            other => other.clone(),
        }
    }

    pub fn undefined(m: Missing) -> Value {
        Value::Undefined(Rc::new(m))
    }

    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::None,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            // An integer beyond i64 (u64 range) has no exact value here: see
            // `json_fits` (render refuses such input rather than print a float).
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::str(s),
            serde_json::Value::Array(a) => {
                Value::List(Rc::new(a.iter().map(Value::from_json).collect()))
            }
            serde_json::Value::Object(o) => Value::Dict(Rc::new(
                o.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            )),
        }
    }

    /// Whether every number in `v` has an exact value here (no integer beyond i64).
    pub fn json_fits(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) => n.is_i64() || n.is_f64(),
            serde_json::Value::Array(a) => a.iter().all(Value::json_fits),
            serde_json::Value::Object(o) => o.values().all(Value::json_fits),
            _ => true,
        }
    }

    /// Python's type name, as jinja2's messages use it (`'dict object' has no ...`).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Undefined(_) => "Undefined",
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Markup(_) => "Markup",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Namespace(_) => "Namespace",
            Value::Macro(_) => "Macro",
            Value::Builtin(_) => "builtin_function_or_method",
            Value::Loop(_) => "LoopContext",
            Value::Gen(_) => "generator",
            Value::View(kind, _) => kind,
        }
    }

    pub fn is_undefined(&self) -> bool {
        matches!(self, Value::Undefined(_))
    }

    /// Python truthiness (jinja2's Undefined is false).
    pub fn truthy(&self) -> bool {
        match self {
            Value::Undefined(_) | Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) | Value::Markup(s) => !s.is_empty(),
            Value::List(l) | Value::Tuple(l) => !l.is_empty(),
            Value::Dict(d) => !d.is_empty(),
            Value::View(_, l) => !l.is_empty(),
            _ => true,
        }
    }

    /// `str(value)` as `{{ value }}` prints it.
    pub fn to_str(&self) -> Result<String, String> {
        Ok(match self {
            Value::Undefined(_) => String::new(),
            Value::Str(s) | Value::Markup(s) => s.to_string(),
            Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) => self.repr()?,
            Value::List(_)
            | Value::Tuple(_)
            | Value::Dict(_)
            | Value::Namespace(_)
            | Value::View(..) => self.repr()?,
            other => return Err(format!("cannot print a {} value", other.type_name())),
        })
    }

    /// Python's `repr()`.
    pub fn repr(&self) -> Result<String, String> {
        let mut out = String::new();
        self.write_repr(&mut out)?;
        Ok(out)
    }

    fn write_repr(&self, out: &mut String) -> Result<(), String> {
        match self {
            Value::Undefined(_) => out.push_str("Undefined"),
            Value::None => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Int(i) => {
                let _ = write!(out, "{}", i);
            }
            Value::Float(f) => out.push_str(&py_float_repr(*f)),
            Value::Str(s) => py_str_repr(s, out),
            Value::Markup(s) => {
                out.push_str("Markup(");
                py_str_repr(s, out);
                out.push(')');
            }
            Value::List(items) | Value::Tuple(items) => {
                let tuple = matches!(self, Value::Tuple(_));
                out.push(if tuple { '(' } else { '[' });
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write_repr(out)?;
                }
                if tuple && items.len() == 1 {
                    out.push(',');
                }
                out.push(if tuple { ')' } else { ']' });
            }
            Value::Dict(items) => write_dict_repr(items, out)?,
            Value::View(kind, items) => {
                out.push_str(kind);
                out.push('(');
                Value::List(Rc::clone(items)).write_repr(out)?;
                out.push(')');
            }
            Value::Namespace(items) => {
                out.push_str("<Namespace ");
                write_dict_repr(&items.borrow(), out)?;
                out.push('>');
            }
            other => return Err(format!("cannot print a {} value", other.type_name())),
        }
        Ok(())
    }

    /// The items of an iterable (a dict iterates its keys, a string its characters).
    pub fn iter_items(&self) -> Result<Vec<Value>, String> {
        Ok(match self {
            Value::Undefined(_) => Vec::new(),
            Value::List(l) | Value::Tuple(l) | Value::View(_, l) => l.as_ref().clone(),
            Value::Gen(g) => std::mem::take(&mut *g.borrow_mut()),
            Value::Dict(d) => d.iter().map(|(k, _)| Value::str(k)).collect(),
            Value::Str(s) => s
                .chars()
                .map(|c| Value::str(c.encode_utf8(&mut [0; 4])))
                .collect(),
            other => {
                return Err(format!(
                    "TypeError: '{}' object is not iterable",
                    other.type_name()
                ))
            }
        })
    }

    pub fn length(&self) -> Result<usize, String> {
        Ok(match self {
            Value::Undefined(_) => 0,
            Value::Str(s) | Value::Markup(s) => s.chars().count(),
            Value::List(l) | Value::Tuple(l) | Value::View(_, l) => l.len(),
            Value::Dict(d) => d.len(),
            other => {
                return Err(format!(
                    "TypeError: object of type '{}' has no len()",
                    other.type_name()
                ))
            }
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(*b as i64 as f64),
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Python's `int`-like view: bools are ints.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Bool(b) => Some(*b as i64),
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

fn write_dict_repr(items: &[(String, Value)], out: &mut String) -> Result<(), String> {
    out.push('{');
    for (i, (k, v)) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        py_str_repr(k, out);
        out.push_str(": ");
        v.write_repr(out)?;
    }
    out.push('}');
    Ok(())
}

/// Python `==` (numbers across int/float/bool compare by value).
pub fn py_eq(a: &Value, b: &Value) -> bool {
    match (&a.plain(), &b.plain()) {
        (Value::Undefined(_), Value::Undefined(_)) => true,
        (Value::None, Value::None) => true,
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| py_eq(p, q))
        }
        (Value::Dict(x), Value::Dict(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.iter().any(|(k2, v2)| k == k2 && py_eq(v, v2)))
        }
        (Value::Namespace(x), Value::Namespace(y)) => Rc::ptr_eq(x, y),
        (Value::Macro(x), Value::Macro(y)) => Rc::ptr_eq(x, y),
        (Value::Builtin(x), Value::Builtin(y)) => x == y,
        (Value::Gen(x), Value::Gen(y)) => Rc::ptr_eq(x, y),
        (Value::View(_, x), Value::View(_, y)) => Rc::ptr_eq(x, y),
        _ => match (a.as_int(), b.as_int()) {
            (Some(x), Some(y)) => x == y,
            _ => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x == y,
                _ => false,
            },
        },
    }
}

/// Python's ordering for `<` and friends; `Err` (a TypeError) for unorderable types.
pub fn py_cmp(a: &Value, b: &Value) -> Result<std::cmp::Ordering, String> {
    use std::cmp::Ordering;
    match (&a.plain(), &b.plain()) {
        (Value::Str(x), Value::Str(y)) => Ok(x.cmp(y)),
        (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
            for (p, q) in x.iter().zip(y.iter()) {
                if !py_eq(p, q) {
                    return py_cmp(p, q);
                }
            }
            Ok(x.len().cmp(&y.len()))
        }
        _ => match (a.as_int(), b.as_int()) {
            (Some(x), Some(y)) => Ok(x.cmp(&y)),
            _ => match (a.as_f64(), b.as_f64()) {
                // NaN is unordered; Python's comparisons with it are all false, which
                // `Equal` approximates for `<`/`>` (never reached by chat templates).
                (Some(x), Some(y)) => Ok(x.partial_cmp(&y).unwrap_or(Ordering::Equal)),
                _ => Err(format!(
                    "TypeError: '<' not supported between instances of '{}' and '{}'",
                    a.type_name(),
                    b.type_name()
                )),
            },
        },
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation for
/// decimal exponents in [-4, 16), else scientific with a two-digit exponent at least.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-7".
    let sci = format!("{:e}", f);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1;
    let n = digits.len() as i32;
    let body = if decpt > -4 && decpt <= 16 {
        if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt >= n {
            format!("{}{}.0", digits, "0".repeat((decpt - n) as usize))
        } else {
            format!(
                "{}.{}",
                &digits[..decpt as usize],
                &digits[decpt as usize..]
            )
        }
    } else {
        let rest = if n > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let e = decpt - 1;
        format!(
            "{}{}e{}{:02}",
            &digits[..1],
            rest,
            if e < 0 { '-' } else { '+' },
            e.abs()
        )
    };
    format!("{}{}", sign, body)
}

/// Whether Python's `str.isprintable()` holds for `c` (approximated: control, format,
/// separator and private-use characters other than the space are not printable).
fn py_printable(c: char) -> bool {
    let u = c as u32;
    !(u < 0x20
        || (0x7f..=0xa0).contains(&u)
        || u == 0xad
        || matches!(u, 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x1680 | 0x180e)
        || (0x2000..=0x200f).contains(&u)
        || (0x2028..=0x202f).contains(&u)
        || (0x205f..=0x2064).contains(&u)
        || (0x2066..=0x206f).contains(&u)
        || u == 0x3000
        || u == 0xfeff
        || (0xfff9..=0xfffb).contains(&u)
        || (0xe000..=0xf8ff).contains(&u)
        || (0xf0000..).contains(&u)
        || (0xe0000..=0xe007f).contains(&u))
}

/// Python's `repr(str)`.
pub fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let u = c as u32;
                let _ = if u < 0x100 {
                    write!(out, "\\x{:02x}", u)
                } else if u < 0x10000 {
                    write!(out, "\\u{:04x}", u)
                } else {
                    write!(out, "\\U{:08x}", u)
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Options of `json.dumps` that shoal's `tojson` passes through.
pub struct JsonOptions {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

/// Python's `json.dumps(value, ...)`.
pub fn json_dumps(v: &Value, opts: &JsonOptions) -> Result<String, String> {
    let mut out = String::new();
    write_json(v, opts, 0, &mut out)?;
    Ok(out)
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7f) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_newline(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_json(v: &Value, opts: &JsonOptions, level: usize, out: &mut String) -> Result<(), String> {
    match v {
        Value::None => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{}", i);
        }
        Value::Float(f) => {
            if f.is_nan() {
                out.push_str("NaN")
            } else if f.is_infinite() {
                out.push_str(if *f > 0.0 { "Infinity" } else { "-Infinity" })
            } else {
                out.push_str(&py_float_repr(*f))
            }
        }
        Value::Str(s) | Value::Markup(s) => json_str(s, opts.ensure_ascii, out),
        Value::List(items) | Value::Tuple(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            json_newline(opts, level, out);
            out.push(']');
        }
        Value::Dict(items) => write_json_object(items, opts, level, out)?,
        other => {
            return Err(format!(
                "TypeError: Object of type {} is not JSON serializable",
                other.type_name()
            ))
        }
    }
    Ok(())
}

fn write_json_object(
    items: &[(String, Value)],
    opts: &JsonOptions,
    level: usize,
    out: &mut String,
) -> Result<(), String> {
    if items.is_empty() {
        out.push_str("{}");
        return Ok(());
    }
    let mut order: Vec<&(String, Value)> = items.iter().collect();
    if opts.sort_keys {
        order.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out.push('{');
    for (i, (k, v)) in order.into_iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        json_newline(opts, level + 1, out);
        json_str(k, opts.ensure_ascii, out);
        out.push_str(&opts.key_sep);
        write_json(v, opts, level + 1, out)?;
    }
    json_newline(opts, level, out);
    out.push('}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (f, want) in [
            (1.0, "1.0"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (123456.789, "123456.789"),
        ] {
            assert_eq!(py_float_repr(f), want);
        }
    }

    #[test]
    fn repr_matches_python() {
        let v = Value::List(Rc::new(vec![
            Value::Int(1),
            Value::str("a"),
            Value::None,
            Value::Dict(Rc::new(vec![("k".into(), Value::str("it's\n"))])),
        ]));
        assert_eq!(v.repr().unwrap(), "[1, 'a', None, {'k': \"it's\\n\"}]");
        assert_eq!(
            Value::Tuple(Rc::new(vec![Value::Int(1)])).repr().unwrap(),
            "(1,)"
        );
    }

    #[test]
    fn json_matches_python_dumps() {
        let v = Value::from_json(
            &serde_json::json!({"b": [1, 2.5, null, true, "<&'>\n\u{e9}\u{1}"], "a": {}}),
        );
        let opts = JsonOptions {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        };
        assert_eq!(
            json_dumps(&v, &opts).unwrap(),
            "{\"b\": [1, 2.5, null, true, \"<&'>\\n\u{e9}\\u0001\"], \"a\": {}}"
        );
    }

    #[test]
    fn equality_crosses_numeric_types() {
        assert!(py_eq(&Value::Int(1), &Value::Float(1.0)));
        assert!(py_eq(&Value::Bool(true), &Value::Int(1)));
        assert!(!py_eq(&Value::str("1"), &Value::Int(1)));
    }
}
