//! jinja2's filters and tests (the ones chat templates use), plus shoal's `tojson` and
//! `strftime_now` globals.

use std::rc::Rc;

use crate::eval::{
    binary, compare, contains, fail, get_item, html_escape, py_capitalize, py_splitlines, EArgs,
    Renderer, R,
};
use crate::lexer::is_py_space;
use crate::value::{json_dumps, py_cmp, py_eq, JsonOptions, Missing, Value};

/// `attribute="a.b.0"` lookups as jinja2's `make_attrgetter` does them (item first).
fn attr_path(v: &Value, path: &str) -> R<Value> {
    let mut cur = v.clone();
    for part in path.split('.') {
        let key = match part.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::str(part),
        };
        cur = get_item(&cur, &key)?;
    }
    Ok(cur)
}

/// The sort/compare key jinja2 uses when `case_sensitive` is false: strings lowercased.
fn fold_case(v: Value, case_sensitive: bool) -> Value {
    match v {
        Value::Str(s) if !case_sensitive => Value::str(&s.to_lowercase()),
        other => other,
    }
}

fn sort_values(items: &mut [(Value, Value)]) -> R<()> {
    let mut error = None;
    items.sort_by(|a, b| match py_cmp(&a.0, &b.0) {
        Ok(o) => o,
        Err(e) => {
            error.get_or_insert(e);
            std::cmp::Ordering::Equal
        }
    });
    match error {
        Some(e) => fail(e),
        None => Ok(()),
    }
}

fn int_arg(args: &EArgs, i: usize, name: &str, default: i64) -> R<i64> {
    match args.get(i, name) {
        None => Ok(default),
        Some(v) => v.as_int().ok_or_else(|| {
            format!(
                "TypeError: {} must be an integer, not {}",
                name,
                v.type_name()
            )
            .into()
        }),
    }
}

/// Python's `int(str)`: surrounding whitespace, a sign, `_` between digits.
fn parse_py_int(s: &str, base: u32) -> Option<i64> {
    let t = s.trim_matches(is_py_space);
    if t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    i64::from_str_radix(&t.replace('_', ""), base).ok()
}

fn parse_py_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(is_py_space).to_ascii_lowercase();
    match t.trim_start_matches(['+', '-']) {
        "inf" | "infinity" | "nan" => {}
        body if body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | '+' | '-' | '_')) => {}
        _ => return None,
    }
    t.replace('_', "").parse::<f64>().ok()
}

/// Filters whose result on a Markup is Markup again (markupsafe's string methods, jinja2's
/// soft_str), and `join` with a Markup separator; None where Markup makes no difference.
fn markup_filter(v: &Value, name: &str, args: &EArgs) -> R<Option<Value>> {
    if let (Some(Value::Markup(sep)), "join") = (args.get(0, "d"), name) {
        // A Markup separator escapes the plain items it joins.
        let sep = sep.to_string();
        let attribute = args.str_arg(1, "attribute", "join's attribute")?;
        let mut parts = Vec::new();
        for item in v.iter_items()? {
            let item = match &attribute {
                Some(a) => attr_path(&item, a)?,
                None => item,
            };
            parts.push(match &item {
                Value::Markup(s) => s.to_string(),
                other => html_escape(&other.to_str()?),
            });
        }
        return Ok(Some(Value::Markup(Rc::from(parts.join(&sep)))));
    }
    let Value::Markup(_) = v else { return Ok(None) };
    Ok(match name {
        "safe" | "string" | "e" | "escape" => Some(v.clone()),
        "upper" | "lower" | "capitalize" | "trim" | "reverse" | "indent" => {
            let mut scratch = Renderer::new(Vec::new());
            match apply(&mut scratch, v.plain(), name, args)? {
                Value::Str(s) => Some(Value::Markup(s)),
                other => Some(other),
            }
        }
        _ => None,
    })
}

/// How many arguments filter `name` takes at most (None: any number).
fn max_filter_args(name: &str) -> Option<usize> {
    Some(match name {
        "safe" | "string" | "length" | "count" | "upper" | "lower" | "capitalize" | "title"
        | "e" | "escape" | "abs" | "first" | "last" | "list" | "reverse" | "items"
        | "wordcount" => 0,
        "trim" | "float" => 1,
        "int" | "round" | "default" | "d" | "join" | "unique" | "min" | "max" | "sum" => 2,
        "replace" | "dictsort" | "sort" | "indent" => 3,
        "tojson" => 4,
        _ => return None,
    })
}

/// Python's `int(float)`, within the 64 bits shoal-template's integers have.
fn float_to_int(f: f64) -> R<i64> {
    if !f.is_finite() {
        return fail("OverflowError: cannot convert float infinity or NaN to integer");
    }
    let t = f.trunc();
    // 2^63 is exact as an f64; i64 holds [-2^63, 2^63).
    if !(-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&t) {
        return fail(
            "OverflowError: an integer beyond 64 bits is not supported by shoal's template subset",
        );
    }
    Ok(t as i64)
}

/// Applies filter `name` to `v`.
pub(crate) fn apply(r: &mut Renderer, v: Value, name: &str, args: &EArgs) -> R<Value> {
    if let Some(max) = max_filter_args(name) {
        let given = args.pos.len() + args.kw.len();
        if given > max {
            return fail(format!(
                "TypeError: the filter '{}' takes at most {} argument(s), {} given",
                name, max, given
            ));
        }
    }
    if let (Value::Undefined(m), "int" | "float") = (&v, name) {
        return fail(format!("UndefinedError: {}", m.message()));
    }
    if let Some(result) = markup_filter(&v, name, args)? {
        return Ok(result);
    }
    let v = v.plain();
    Ok(match name {
        "safe" => Value::Markup(Rc::from(v.to_str()?)),
        "string" => Value::str(&v.to_str()?),
        "trim" => {
            let chars = args.str_arg(0, "chars", "trim's chars")?;
            let s = v.to_str()?;
            let t = match &chars {
                Some(set) => s.trim_matches(|c| set.contains(c)),
                None => s.trim_matches(is_py_space),
            };
            Value::str(t)
        }
        "length" | "count" => Value::Int(v.length()? as i64),
        "upper" => Value::str(&v.to_str()?.to_uppercase()),
        "lower" => Value::str(&v.to_str()?.to_lowercase()),
        "capitalize" => Value::str(&py_capitalize(&v.to_str()?)),
        "title" => Value::str(&jinja_title(&v.to_str()?)),
        "replace" => {
            let s = v.to_str()?;
            let old = args
                .get(0, "old")
                .map(Value::to_str)
                .transpose()?
                .unwrap_or_default();
            let new = args
                .get(1, "new")
                .map(Value::to_str)
                .transpose()?
                .unwrap_or_default();
            match args.get(2, "count") {
                None | Some(Value::None) => Value::str(&s.replace(&old, &new)),
                Some(c) => {
                    let n = c.as_int().ok_or_else(|| {
                        "TypeError: replace's count must be an integer".to_string()
                    })?;
                    Value::str(&if n < 0 {
                        s.replace(&old, &new)
                    } else {
                        s.replacen(&old, &new, n as usize)
                    })
                }
            }
        }
        "e" | "escape" => Value::Markup(Rc::from(html_escape(&v.to_str()?))),
        "int" => {
            let default = args.get(0, "default").cloned().unwrap_or(Value::Int(0));
            let base = int_arg(args, 1, "base", 10)?;
            match &v {
                Value::Int(_) => v.clone(),
                Value::Bool(b) => Value::Int(*b as i64),
                Value::Float(f) => Value::Int(float_to_int(*f)?),
                Value::Str(s) => match parse_py_int(s, base.clamp(2, 36) as u32) {
                    Some(i) => Value::Int(i),
                    None => match parse_py_float(s) {
                        Some(f) => Value::Int(float_to_int(f)?),
                        None => default,
                    },
                },
                _ => default,
            }
        }
        "float" => {
            let default = args.get(0, "default").cloned().unwrap_or(Value::Float(0.0));
            match &v {
                Value::Int(_) | Value::Bool(_) | Value::Float(_) => {
                    Value::Float(v.as_f64().unwrap_or(0.0))
                }
                Value::Str(s) => parse_py_float(s).map_or(default, Value::Float),
                _ => default,
            }
        }
        "abs" => match v {
            Value::Int(i) => Value::Int(
                i.checked_abs()
                    .ok_or_else(|| "OverflowError: integer overflow".to_string())?,
            ),
            Value::Bool(b) => Value::Int(b as i64),
            Value::Float(f) => Value::Float(f.abs()),
            other => {
                return fail(format!(
                    "TypeError: bad operand type for abs(): '{}'",
                    other.type_name()
                ))
            }
        },
        "round" => {
            let precision = int_arg(args, 0, "precision", 0)?;
            let method = args
                .str_arg(1, "method", "round's method")?
                .unwrap_or_else(|| "common".into());
            let x = v
                .as_f64()
                .ok_or_else(|| format!("TypeError: cannot round a {}", v.type_name()))?;
            match method.as_str() {
                "common" => {
                    if let Value::Int(_) | Value::Bool(_) = v {
                        if precision >= 0 {
                            return Ok(Value::Int(v.as_int().unwrap_or(0)));
                        }
                    }
                    if precision < 0 {
                        return fail("round with a negative precision is not supported by shoal's template subset");
                    }
                    // Rust's fixed-precision formatting rounds the exact binary value half
                    // to even, as Python's round() does.
                    Value::Float(format!("{:.*}", precision as usize, x).parse().unwrap_or(x))
                }
                "floor" | "ceil" => {
                    let scale = 10f64.powi(precision as i32);
                    let y = x * scale;
                    Value::Float(
                        if method == "floor" {
                            y.floor()
                        } else {
                            y.ceil()
                        } / scale,
                    )
                }
                _ => return fail("TypeError: method must be 'common', 'ceil' or 'floor'"),
            }
        }
        "default" | "d" => {
            let fallback = args
                .get(0, "default_value")
                .cloned()
                .unwrap_or_else(|| Value::str(""));
            let boolean = args.bool_arg(1, "boolean", false);
            if v.is_undefined() || (boolean && !v.truthy()) {
                fallback
            } else {
                v
            }
        }
        "first" => match &v {
            // Takes one item of an iterator, leaving the rest.
            Value::Gen(g) => {
                let mut items = g.borrow_mut();
                if items.is_empty() {
                    Value::undefined(Missing::Plain)
                } else {
                    items.remove(0)
                }
            }
            _ => v
                .iter_items()?
                .into_iter()
                .next()
                .unwrap_or_else(|| Value::undefined(Missing::Plain)),
        },
        "last" => {
            if let Value::Gen(_) = &v {
                return fail("TypeError: 'generator' object is not reversible");
            }
            v.iter_items()?
                .pop()
                .unwrap_or_else(|| Value::undefined(Missing::Plain))
        }
        "list" => Value::List(Rc::new(v.iter_items()?)),
        "reverse" => match &v {
            Value::Str(s) => Value::str(&s.chars().rev().collect::<String>()),
            // reversed(): an iterator; a generator is not reversible, so it is listed first.
            Value::Gen(_) => {
                let mut items = v.iter_items()?;
                items.reverse();
                Value::List(Rc::new(items))
            }
            _ => {
                let mut items = v.iter_items()?;
                items.reverse();
                Value::gen(items)
            }
        },
        "items" => match &v {
            Value::Undefined(_) => Value::gen(Vec::new()),
            Value::Dict(d) => Value::gen(
                d.iter()
                    .map(|(k, x)| Value::Tuple(Rc::new(vec![Value::str(k), x.clone()])))
                    .collect(),
            ),
            _ => return fail("TypeError: Can only get item pairs from a mapping."),
        },
        "dictsort" => {
            let case_sensitive = args.bool_arg(0, "case_sensitive", false);
            let by_value = match args.str_arg(1, "by", "dictsort's by")?.as_deref() {
                None | Some("key") => false,
                Some("value") => true,
                Some(_) => {
                    return fail(
                        "FilterArgumentError: You can only sort by either \"key\" or \"value\"",
                    )
                }
            };
            let reverse = args.bool_arg(2, "reverse", false);
            let Value::Dict(d) = &v else {
                return fail("TypeError: dictsort needs a mapping");
            };
            let mut keyed: Vec<(Value, Value)> = d
                .iter()
                .map(|(k, x)| {
                    let key = if by_value { x.clone() } else { Value::str(k) };
                    (
                        fold_case(key, case_sensitive),
                        Value::Tuple(Rc::new(vec![Value::str(k), x.clone()])),
                    )
                })
                .collect();
            sort_values(&mut keyed)?;
            if reverse {
                keyed.reverse();
            }
            Value::List(Rc::new(keyed.into_iter().map(|(_, x)| x).collect()))
        }
        "join" => {
            let sep = args
                .get(0, "d")
                .map(Value::to_str)
                .transpose()?
                .unwrap_or_default();
            let attribute = args.str_arg(1, "attribute", "join's attribute")?;
            let mut parts = Vec::new();
            for item in v.iter_items()? {
                let item = match &attribute {
                    Some(a) => attr_path(&item, a)?,
                    None => item,
                };
                parts.push(item.to_str()?);
            }
            Value::str(&parts.join(&sep))
        }
        "tojson" => {
            let ensure_ascii = args.bool_arg(0, "ensure_ascii", false);
            let indent = match args.get(1, "indent") {
                None | Some(Value::None) => None,
                Some(Value::Str(s)) => Some(s.to_string()),
                Some(i) => {
                    let width = i.as_int().ok_or_else(|| {
                        "TypeError: tojson's indent must be an integer or string".to_string()
                    })?;
                    if width > 1024 {
                        return fail(
                            "tojson indents over 1024 are not supported by shoal's template subset",
                        );
                    }
                    Some(" ".repeat(width.max(0) as usize))
                }
            };
            let (item_sep, key_sep) = match args.get(2, "separators") {
                None | Some(Value::None) => (
                    (if indent.is_some() { "," } else { ", " }).to_string(),
                    ": ".to_string(),
                ),
                Some(Value::List(p) | Value::Tuple(p)) if p.len() == 2 => {
                    (p[0].to_str()?, p[1].to_str()?)
                }
                Some(_) => {
                    return fail("ValueError: tojson's separators must be a pair of strings")
                }
            };
            let sort_keys = args.bool_arg(3, "sort_keys", false);
            let opts = JsonOptions {
                ensure_ascii,
                indent,
                item_sep,
                key_sep,
                sort_keys,
            };
            Value::str(&json_dumps(&v, &opts)?)
        }
        "map" => {
            // jinja2's map/select/reject skip a falsy value instead of iterating it.
            let items = if v.truthy() {
                v.iter_items()?
            } else {
                Vec::new()
            };
            let mut out = Vec::with_capacity(items.len());
            if let Some(attribute) = args
                .kw
                .iter()
                .find(|(k, _)| k == "attribute")
                .map(|(_, a)| a.to_str())
                .transpose()?
            {
                let default = args
                    .kw
                    .iter()
                    .find(|(k, _)| k == "default")
                    .map(|(_, d)| d.clone());
                for item in items {
                    let x = attr_path(&item, &attribute)?;
                    out.push(match (&x, &default) {
                        (Value::Undefined(_), Some(d)) => d.clone(),
                        _ => x,
                    });
                }
            } else {
                let Some(Value::Str(fname)) = args.pos.first() else {
                    return fail("map needs a filter name or attribute=");
                };
                if !crate::parser::FILTERS.contains(&fname.as_ref()) {
                    return fail(format!(
                        "the filter '{}' (in map) is not supported by shoal's template subset",
                        fname
                    ));
                }
                for item in items {
                    out.push(r.apply_filter(
                        item,
                        fname,
                        args.pos[1..].to_vec(),
                        args.kw.clone(),
                    )?);
                }
            }
            Value::gen(out)
        }
        "select" | "reject" | "selectattr" | "rejectattr" => {
            let by_attr = name.ends_with("attr");
            let keep_if = name.starts_with("select");
            let mut rest = args.pos.iter();
            let attribute = if by_attr {
                match rest.next() {
                    Some(a) => Some(a.to_str()?),
                    None => return fail(format!("{} needs an attribute name", name)),
                }
            } else {
                None
            };
            let test = match rest.next() {
                Some(t) => Some(t.to_str()?),
                None => None,
            };
            if let Some(t) = &test {
                if !crate::parser::TESTS.contains(&t.as_str()) {
                    return fail(format!(
                        "the test '{}' (in {}) is not supported by shoal's template subset",
                        t, name
                    ));
                }
            }
            let test_args: Vec<Value> = rest.cloned().collect();
            let mut out = Vec::new();
            let items = if v.truthy() {
                v.iter_items()?
            } else {
                Vec::new()
            };
            for item in items {
                let subject = match &attribute {
                    Some(a) => attr_path(&item, a)?,
                    None => item.clone(),
                };
                let passed = match &test {
                    Some(t) => r.apply_test(&subject, t, test_args.clone())?,
                    None => subject.truthy(),
                };
                if passed == keep_if {
                    out.push(item);
                }
            }
            Value::gen(out)
        }
        "sort" | "unique" | "min" | "max" => {
            let (reverse, case_sensitive, attribute) = if name == "sort" {
                (
                    args.bool_arg(0, "reverse", false),
                    args.bool_arg(1, "case_sensitive", false),
                    args.str_arg(2, "attribute", "sort's attribute")?,
                )
            } else {
                (
                    false,
                    args.bool_arg(0, "case_sensitive", false),
                    args.str_arg(1, "attribute", "the attribute")?,
                )
            };
            let mut keyed = Vec::new();
            for item in v.iter_items()? {
                let key = match &attribute {
                    Some(a) => attr_path(&item, a)?,
                    None => item.clone(),
                };
                keyed.push((fold_case(key, case_sensitive), item));
            }
            match name {
                "unique" => {
                    let mut seen: Vec<Value> = Vec::new();
                    let mut out = Vec::new();
                    for (k, item) in keyed {
                        if !seen.iter().any(|s| py_eq(s, &k)) {
                            seen.push(k);
                            out.push(item);
                        }
                    }
                    Value::gen(out)
                }
                _ => {
                    sort_values(&mut keyed)?;
                    match name {
                        "sort" => {
                            if reverse {
                                // Python's reverse sort stays stable: reverse, sort, reverse.
                                keyed.reverse();
                                sort_values(&mut keyed)?;
                                keyed.reverse();
                            }
                            Value::List(Rc::new(keyed.into_iter().map(|(_, x)| x).collect()))
                        }
                        "min" => keyed
                            .into_iter()
                            .next()
                            .map_or_else(|| Value::undefined(Missing::Plain), |(_, x)| x),
                        _ => {
                            // max() returns the first of equal maxima.
                            let mut best: Option<(Value, Value)> = None;
                            for (k, x) in keyed {
                                let better = match &best {
                                    None => true,
                                    Some((bk, _)) => py_cmp(&k, bk)? == std::cmp::Ordering::Greater,
                                };
                                if better {
                                    best = Some((k, x));
                                }
                            }
                            best.map_or_else(|| Value::undefined(Missing::Plain), |(_, x)| x)
                        }
                    }
                }
            }
        }
        "sum" => {
            let attribute = args.str_arg(0, "attribute", "sum's attribute")?;
            let mut total = args.get(1, "start").cloned().unwrap_or(Value::Int(0));
            for item in v.iter_items()? {
                let x = match &attribute {
                    Some(a) => attr_path(&item, a)?,
                    None => item,
                };
                total = binary("+", &total, &x)?;
            }
            total
        }
        "indent" => {
            let indention = match args.get(0, "width") {
                None => "    ".to_string(),
                Some(Value::Str(s)) => s.to_string(),
                Some(w) => {
                    let width = w.as_int().ok_or_else(|| {
                        "TypeError: indent's width must be an integer".to_string()
                    })?;
                    if width > 1024 {
                        return fail(
                            "indent widths over 1024 are not supported by shoal's template subset",
                        );
                    }
                    " ".repeat(width.max(0) as usize)
                }
            };
            let first = args.bool_arg(1, "first", false);
            let blank = args.bool_arg(2, "blank", false);
            // jinja2 appends a newline to the value itself ("this quirk is intended"): only
            // a string survives that.
            let Value::Str(s) = &v else {
                return fail(format!(
                    "TypeError: indent needs a string, not {}",
                    v.type_name()
                ));
            };
            let s = format!("{}\n", s);
            let lines = py_splitlines(&s);
            let mut rv = if blank {
                lines.join(&format!("\n{}", indention))
            } else {
                let mut it = lines.into_iter();
                let mut rv = it.next().unwrap_or_default();
                let rest: Vec<String> = it
                    .map(|l| {
                        if l.is_empty() {
                            l
                        } else {
                            format!("{}{}", indention, l)
                        }
                    })
                    .collect();
                if !rest.is_empty() {
                    rv.push('\n');
                    rv.push_str(&rest.join("\n"));
                }
                rv
            };
            if first {
                rv = format!("{}{}", indention, rv);
            }
            Value::str(&rv)
        }
        "wordcount" => {
            let s = v.to_str()?;
            let words = s
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty())
                .count();
            Value::Int(words as i64)
        }
        _ => {
            return fail(format!(
                "the filter '{}' is not supported by shoal's template subset",
                name
            ))
        }
    })
}

/// jinja2's `title` filter (not Python's `str.title`): words start after `-`, whitespace
/// or an opening bracket.
fn jinja_title(s: &str) -> String {
    let is_sep = |c: char| c == '-' || is_py_space(c) || matches!(c, '(' | '{' | '[' | '<');
    let mut out = String::with_capacity(s.len());
    // Chunks alternate between separator runs and words; each gets its first character
    // uppercased and the rest lowercased as a string (a final sigma becomes 'ς').
    let mut rest = s;
    while let Some(first) = rest.chars().next() {
        let sep = is_sep(first);
        let end = rest.find(|c: char| is_sep(c) != sep).unwrap_or(rest.len());
        let (chunk, tail) = rest.split_at(end);
        out.extend(first.to_uppercase());
        out.push_str(&chunk[first.len_utf8()..].to_lowercase());
        rest = tail;
    }
    out
}

fn is_lower(s: &str) -> bool {
    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)
}

fn is_upper(s: &str) -> bool {
    s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase)
}

/// Applies test `name` (`v is name(args)`).
pub(crate) fn test(v: &Value, name: &str, args: &EArgs) -> R<bool> {
    let takes_arg = matches!(
        name,
        "divisibleby"
            | "eq"
            | "equalto"
            | "=="
            | "ne"
            | "!="
            | "lt"
            | "lessthan"
            | "<"
            | "le"
            | "<="
            | "gt"
            | "greaterthan"
            | ">"
            | "ge"
            | ">="
            | "in"
            | "sameas"
    );
    let v = &v.plain();
    let given = args.pos.len() + args.kw.len();
    if given != usize::from(takes_arg) {
        return fail(format!(
            "TypeError: the test '{}' takes {} argument(s), {} given",
            name,
            usize::from(takes_arg),
            given
        ));
    }
    let arg = || {
        args.pos
            .first()
            .cloned()
            .unwrap_or_else(|| Value::undefined(Missing::Plain))
    };
    Ok(match name {
        "defined" => !v.is_undefined(),
        "undefined" => v.is_undefined(),
        "none" => matches!(v, Value::None),
        "boolean" => matches!(v, Value::Bool(_)),
        "true" => matches!(v, Value::Bool(true)),
        "false" => matches!(v, Value::Bool(false)),
        "string" => matches!(v, Value::Str(_)),
        "number" => matches!(v, Value::Int(_) | Value::Float(_) | Value::Bool(_)),
        "integer" => matches!(v, Value::Int(_)),
        "float" => matches!(v, Value::Float(_)),
        "mapping" => matches!(v, Value::Dict(_)),
        "iterable" => matches!(
            v,
            Value::Str(_)
                | Value::List(_)
                | Value::Tuple(_)
                | Value::Dict(_)
                | Value::Undefined(_)
                | Value::Gen(_)
                | Value::View(..)
        ),
        "sequence" => {
            matches!(
                v,
                Value::Str(_)
                    | Value::List(_)
                    | Value::Tuple(_)
                    | Value::Dict(_)
                    | Value::Undefined(_)
            )
        }
        "callable" => matches!(v, Value::Macro(_) | Value::Builtin(_)),
        "even" | "odd" => {
            let r = binary("%", v, &Value::Int(2))?;
            py_eq(&r, &Value::Int(if name == "even" { 0 } else { 1 }))
        }
        "divisibleby" => py_eq(&binary("%", v, &arg())?, &Value::Int(0)),
        "eq" | "equalto" | "==" => py_eq(v, &arg()),
        "ne" | "!=" => !py_eq(v, &arg()),
        "lt" | "lessthan" | "<" => compare("<", v, &arg())?,
        "le" | "<=" => compare("<=", v, &arg())?,
        "gt" | "greaterthan" | ">" => compare(">", v, &arg())?,
        "ge" | ">=" => compare(">=", v, &arg())?,
        "in" => contains(&arg(), v)?,
        "sameas" => match (v, &arg()) {
            (Value::None, Value::None) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::List(a), Value::List(b)) => Rc::ptr_eq(a, b),
            (Value::Dict(a), Value::Dict(b)) => Rc::ptr_eq(a, b),
            _ => false,
        },
        "lower" => is_lower(&v.to_str()?),
        "upper" => is_upper(&v.to_str()?),
        _ => {
            return fail(format!(
                "the test '{}' is not supported by shoal's template subset",
                name
            ))
        }
    })
}

/// shoal's `strftime_now(format)`: the local time now, through the C library's `strftime`
/// (what Python's `datetime.strftime` uses).
pub(crate) fn strftime_now(fmt: &str) -> R<String> {
    if fmt.contains('\0') {
        return fail("ValueError: embedded null character in strftime_now's format");
    }
    let Ok(cfmt) = std::ffi::CString::new(fmt) else {
        return fail("ValueError: bad format");
    };
    // SAFETY: `time`, `localtime_r` and `strftime` get valid pointers to live locals, and
    // strftime writes at most `buf.len()` bytes.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return fail("OSError: localtime failed");
        }
        let mut buf = vec![0u8; 256 + fmt.len() * 16];
        let n = libc::strftime(
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
            cfmt.as_ptr(),
            &tm,
        );
        if n == 0 && !fmt.is_empty() {
            return Ok(String::new());
        }
        buf.truncate(n);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jinja_title_splits_on_dashes_and_brackets() {
        assert_eq!(jinja_title("hello world-foo (bar"), "Hello World-Foo (Bar");
        assert_eq!(jinja_title("hELLO"), "Hello");
    }

    #[test]
    fn python_number_parsing() {
        assert_eq!(parse_py_int(" 1_000 ", 10), Some(1000));
        assert_eq!(parse_py_int("1__0", 10), None);
        assert_eq!(parse_py_float("2.5"), Some(2.5));
        assert_eq!(parse_py_float("abc"), None);
    }
}
