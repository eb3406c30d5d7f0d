//! Renders a parsed template: jinja2's semantics (its default `Undefined`, scoping of `for`
//! and macros, the immutable sandbox) over [`Value`]s.

use std::rc::Rc;
use std::sync::Arc;

use crate::parser::{Args, Expr, LExpr, Lit, Node, Target};
use crate::value::{py_cmp, py_eq, Builtin, LoopInfo, MacroValue, Missing, Value};

/// Why rendering stopped.
#[derive(Debug)]
pub enum Fail {
    /// The template's own `raise_exception(message)`.
    Raise(String),
    /// Any other error; `located` once a line number is in the message.
    Error { msg: String, located: bool },
}

impl From<String> for Fail {
    fn from(msg: String) -> Fail {
        Fail::Error {
            msg,
            located: false,
        }
    }
}

impl Fail {
    fn at(self, line: usize) -> Fail {
        match self {
            Fail::Error {
                msg,
                located: false,
            } => Fail::Error {
                msg: format!("line {}: {}", line, msg),
                located: true,
            },
            other => other,
        }
    }

    pub fn message(self) -> String {
        match self {
            Fail::Raise(m) => m,
            Fail::Error { msg, .. } => msg,
        }
    }
}

pub(crate) type R<T> = Result<T, Fail>;

pub(crate) fn fail<T>(msg: impl Into<String>) -> R<T> {
    Err(Fail::from(msg.into()))
}

/// How a statement list ended (for `break`/`continue`, jinja2's loopcontrols).
#[derive(PartialEq)]
enum Flow {
    Normal,
    Break,
    Continue,
}

// Python's default recursion limit is 1000 frames; a macro level costs jinja2 several.
// Kept low enough for a 2 MiB thread stack (tokio's default) to hold the nested calls.
const MAX_MACRO_DEPTH: usize = 64;
/// The longest string or list `*` may build (Python would go on to a MemoryError; a
/// frontend must not abort on a template's `'x' * 10**12`).
const MAX_EVAL_DEPTH: usize = 400;
pub(crate) const MAX_REPEAT_ITEMS: i64 = 1 << 24;
// The sandbox's cap on range() (jinja2.sandbox.MAX_RANGE).
const MAX_RANGE: i64 = 100_000;

const DICT_METHODS: &[&str] = &[
    "get",
    "items",
    "keys",
    "values",
    "pop",
    "popitem",
    "update",
    "setdefault",
    "clear",
    "copy",
    "fromkeys",
];
const STR_METHODS: &[&str] = &[
    "strip",
    "lstrip",
    "rstrip",
    "startswith",
    "endswith",
    "split",
    "rsplit",
    "upper",
    "lower",
    "replace",
    "title",
    "capitalize",
    "find",
    "count",
    "join",
    "splitlines",
    "isdigit",
    "isalpha",
    "isspace",
    "format",
];
const LIST_METHODS: &[&str] = &[
    "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "index", "count",
    "copy",
];

pub(crate) struct EArgs {
    pub(crate) pos: Vec<Value>,
    pub(crate) kw: Vec<(String, Value)>,
}

impl EArgs {
    /// Argument `i` by position or by `name`.
    pub(crate) fn get(&self, i: usize, name: &str) -> Option<&Value> {
        self.pos
            .get(i)
            .or_else(|| self.kw.iter().find(|(k, _)| k == name).map(|(_, v)| v))
    }

    pub(crate) fn str_arg(&self, i: usize, name: &str, what: &str) -> R<Option<String>> {
        match self.get(i, name) {
            None | Some(Value::None) => Ok(None),
            Some(Value::Str(s) | Value::Markup(s)) => Ok(Some(s.to_string())),
            Some(other) => fail(format!(
                "TypeError: {} must be a string, not {}",
                what,
                other.type_name()
            )),
        }
    }

    pub(crate) fn bool_arg(&self, i: usize, name: &str, default: bool) -> bool {
        self.get(i, name).map_or(default, Value::truthy)
    }
}

pub struct Renderer {
    /// Variable scopes, innermost last: the root (globals, the render's variables, top-level
    /// `set`s), then one per for-loop iteration or macro call.
    frames: Vec<Vec<(String, Value)>>,
    macro_depth: usize,
    eval_depth: usize,
}

impl Renderer {
    pub fn new(root: Vec<(String, Value)>) -> Renderer {
        Renderer {
            frames: vec![root],
            macro_depth: 0,
            eval_depth: 0,
        }
    }

    pub fn render(&mut self, nodes: &[Node]) -> Result<String, Fail> {
        let mut out = String::new();
        match self.exec(nodes, &mut out)? {
            Flow::Normal => Ok(out),
            _ => fail("'break'/'continue' outside a for loop"),
        }
    }

    fn lookup(&self, name: &str) -> Value {
        for frame in self.frames.iter().rev() {
            if let Some((_, v)) = frame.iter().rev().find(|(k, _)| k == name) {
                return v.clone();
            }
        }
        Value::undefined(Missing::Name(name.to_string()))
    }

    fn assign(&mut self, name: &str, value: Value) {
        let frame = self
            .frames
            .last_mut()
            .expect("the root frame is never popped");
        // The last binding of a name wins (the root frame may hold a special token twice:
        // the default and the caller's override).
        match frame.iter_mut().rev().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => frame.push((name.to_string(), value)),
        }
    }

    fn assign_target(&mut self, target: &Target, value: Value) -> R<()> {
        match target {
            Target::Name(n) => self.assign(n, value),
            Target::Tuple(names) => {
                let items = match &value {
                    Value::List(l) | Value::Tuple(l) => l.as_ref().clone(),
                    Value::Str(_) | Value::Markup(_) => value.iter_items()?,
                    other => {
                        return fail(format!(
                            "TypeError: cannot unpack non-iterable {} object",
                            other.type_name()
                        ))
                    }
                };
                if items.len() != names.len() {
                    return fail(format!(
                        "ValueError: expected {} values to unpack, got {}",
                        names.len(),
                        items.len()
                    ));
                }
                for (n, v) in names.iter().zip(items) {
                    self.assign(n, v);
                }
            }
            Target::Attr(ns, attr) => match self.lookup(ns) {
                Value::Namespace(cell) => {
                    // A namespace holding a namespace could hold itself: a cycle that
                    // printing would recurse through forever.
                    if contains_namespace(&value, MAX_VALUE_NESTING) {
                        return fail("a namespace inside a namespace attribute is not supported by shoal's template subset");
                    }
                    check_nesting(std::slice::from_ref(&value))?;
                    let mut items = cell.borrow_mut();
                    match items.iter_mut().find(|(k, _)| k == attr) {
                        Some(slot) => slot.1 = value,
                        None => items.push((attr.clone(), value)),
                    }
                }
                _ => {
                    return fail(format!(
                        "cannot assign attribute on non-namespace object '{}'",
                        ns
                    ))
                }
            },
        }
        Ok(())
    }

    fn exec(&mut self, nodes: &[Node], out: &mut String) -> R<Flow> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Output(e) => {
                    let v = self.leval(e)?;
                    out.push_str(&v.to_str().map_err(|m| Fail::from(m).at(e.line))?);
                }
                Node::If(branches, else_body) => {
                    let mut taken = None;
                    for (cond, body) in branches {
                        if self.leval(cond)?.truthy() {
                            taken = Some(body);
                            break;
                        }
                    }
                    let flow = self.exec(taken.unwrap_or(else_body), out)?;
                    if flow != Flow::Normal {
                        return Ok(flow);
                    }
                }
                Node::For {
                    target,
                    iter,
                    filter,
                    body,
                    else_body,
                    line,
                } => {
                    self.exec_for(target, iter, filter.as_ref(), body, else_body, out)
                        .map_err(|f| f.at(*line))?;
                }
                Node::Set(target, value) => {
                    let v = self.leval(value)?;
                    self.assign_target(target, v)
                        .map_err(|f| f.at(value.line))?;
                }
                Node::SetBlock(name, body, filters, line) => {
                    let mut captured = String::new();
                    // The block is a scope of its own: its `set`s stay inside. `break` or
                    // `continue` in it leaves the name unassigned.
                    self.frames.push(Vec::new());
                    let flow = self.exec(body, &mut captured);
                    self.frames.pop();
                    let flow = flow?;
                    if flow != Flow::Normal {
                        return Ok(flow);
                    }
                    let mut v = Value::str(&captured);
                    for (fname, args) in filters {
                        let args = self.eval_args(args).map_err(|f| f.at(*line))?;
                        v = self.filter(v, fname, &args).map_err(|f| f.at(*line))?;
                    }
                    self.assign(name, v);
                }
                Node::Macro(def) => {
                    let closure = self.frames[1..].to_vec();
                    let value = MacroValue {
                        def: Arc::clone(def),
                        closure,
                    };
                    self.assign(&def.name, Value::Macro(Rc::new(value)));
                }
                Node::Break => return Ok(Flow::Break),
                Node::Continue => return Ok(Flow::Continue),
            }
        }
        Ok(Flow::Normal)
    }

    fn exec_for(
        &mut self,
        target: &Target,
        iter: &LExpr,
        filter: Option<&LExpr>,
        body: &[Node],
        else_body: &[Node],
        out: &mut String,
    ) -> R<()> {
        let mut items = self.leval(iter)?.iter_items()?;
        if let Some(cond) = filter {
            let mut kept = Vec::with_capacity(items.len());
            for item in items {
                self.frames.push(Vec::new());
                let keep = self
                    .assign_target(target, item.clone())
                    .and_then(|_| self.leval(cond));
                // jinja2 filters through a generator that yields the unpacked names again:
                // with `for a, b in ... if ...`, the items (loop.previtem, ...) are tuples.
                let item = match target {
                    Target::Tuple(names) => {
                        Value::Tuple(Rc::new(names.iter().map(|n| self.lookup(n)).collect()))
                    }
                    _ => item,
                };
                self.frames.pop();
                if keep?.truthy() {
                    kept.push(item);
                }
            }
            items = kept;
        }
        let length = items.len();
        // jinja2 marks the loop as iterated at the end of a body run to completion: a loop
        // whose every iteration ends in `break`/`continue` still runs its `else`.
        let mut completed = false;
        for index0 in 0..length {
            let info = LoopInfo {
                index0,
                length,
                prev: index0.checked_sub(1).map(|i| items[i].clone()),
                next: items.get(index0 + 1).cloned(),
            };
            // Each iteration has its own scope: a `set` in the body does not outlive it.
            self.frames
                .push(vec![("loop".to_string(), Value::Loop(Rc::new(info)))]);
            let flow = self
                .assign_target(target, items[index0].clone())
                .and_then(|_| self.exec(body, out));
            self.frames.pop();
            match flow? {
                Flow::Break => break,
                Flow::Continue => {}
                Flow::Normal => completed = true,
            }
        }
        if !completed {
            self.exec(else_body, out)?;
        }
        Ok(())
    }

    fn leval(&mut self, e: &LExpr) -> R<Value> {
        self.eval(&e.expr).map_err(|f| f.at(e.line))
    }

    fn eval_args(&mut self, args: &Args) -> R<EArgs> {
        let mut pos = Vec::with_capacity(args.pos.len());
        for a in &args.pos {
            pos.push(self.eval(a)?);
        }
        let mut kw = Vec::with_capacity(args.kw.len());
        for (k, a) in &args.kw {
            kw.push((k.clone(), self.eval(a)?));
        }
        Ok(EArgs { pos, kw })
    }

    fn eval(&mut self, e: &Expr) -> R<Value> {
        // Bounds the Rust stack whatever mix of nested expressions and macro calls a
        // template makes (Python's own limit is its RecursionError).
        if self.eval_depth >= MAX_EVAL_DEPTH {
            return fail("RecursionError: expressions and macro calls nested too deep");
        }
        self.eval_depth += 1;
        let result = self.eval_inner(e);
        self.eval_depth -= 1;
        result
    }

    fn eval_inner(&mut self, e: &Expr) -> R<Value> {
        Ok(match e {
            Expr::Const(lit) => match lit {
                Lit::None => Value::None,
                Lit::Bool(b) => Value::Bool(*b),
                Lit::Int(i) => Value::Int(*i),
                Lit::Float(f) => Value::Float(*f),
                Lit::Str(s) => Value::str(s),
            },
            Expr::Name(n) => self.lookup(n),
            Expr::List(items) | Expr::Tuple(items) => {
                let mut vs = Vec::with_capacity(items.len());
                for i in items {
                    vs.push(self.eval(i)?);
                }
                check_nesting(&vs)?;
                if matches!(e, Expr::List(_)) {
                    Value::List(Rc::new(vs))
                } else {
                    Value::Tuple(Rc::new(vs))
                }
            }
            Expr::Dict(pairs) => {
                let mut items: Vec<(String, Value)> = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    let key = match self.eval(k)? {
                        Value::Str(s) | Value::Markup(s) => s.to_string(),
                        other => return fail(format!("dict keys other than strings ({}) are not supported by shoal's template subset", other.type_name())),
                    };
                    let value = self.eval(v)?;
                    check_nesting(std::slice::from_ref(&value))?;
                    match items.iter_mut().find(|(k2, _)| *k2 == key) {
                        Some(slot) => slot.1 = value,
                        None => items.push((key, value)),
                    }
                }
                Value::Dict(Rc::new(items))
            }
            Expr::Attr(obj, name) => {
                let o = self.eval(obj)?;
                get_attr(&o, name)?
            }
            Expr::Item(obj, key) => {
                let o = self.eval(obj)?;
                let k = self.eval(key)?;
                get_item(&o, &k)?
            }
            Expr::Slice(obj, start, stop, step) => {
                let o = self.eval(obj)?;
                let mut bound = |b: &Option<Box<Expr>>| -> R<Option<i64>> {
                    match b {
                        None => Ok(None),
                        Some(b) => match self.eval(b)? {
                            Value::None => Ok(None),
                            v => v.as_int().map(Some).ok_or_else(|| {
                                Fail::from(
                                    "TypeError: slice indices must be integers or None".to_string(),
                                )
                            }),
                        },
                    }
                };
                let (a, b, c) = (bound(start)?, bound(stop)?, bound(step)?);
                slice(&o, a, b, c)?
            }
            Expr::Call(func, args) => {
                if let Expr::Attr(obj, name) = func.as_ref() {
                    let o = self.eval(obj)?;
                    let args = self.eval_args(args)?;
                    return self.call_method(o, name, args);
                }
                let f = self.eval(func)?;
                let args = self.eval_args(args)?;
                self.call(f, args)?
            }
            Expr::Filter(inner, name, args) => {
                let v = self.eval(inner)?;
                let args = self.eval_args(args)?;
                self.filter(v, name, &args)?
            }
            Expr::Test(inner, name, args) => {
                let v = self.eval(inner)?;
                let args = self.eval_args(args)?;
                Value::Bool(self.test(&v, name, &args)?)
            }
            Expr::Unary(op, inner) => {
                let v = self.eval(inner)?;
                match (op, &v) {
                    (_, Value::Undefined(m)) => {
                        return fail(format!("UndefinedError: {}", m.message()))
                    }
                    (&"-", Value::Int(i)) => Value::Int(
                        i.checked_neg()
                            .ok_or_else(|| "integer overflow".to_string())?,
                    ),
                    (&"-", Value::Bool(b)) => Value::Int(-(*b as i64)),
                    (&"-", Value::Float(f)) => Value::Float(-f),
                    (&"+", Value::Int(_) | Value::Float(_)) => v.clone(),
                    (&"+", Value::Bool(b)) => Value::Int(*b as i64),
                    _ => {
                        return fail(format!(
                            "TypeError: bad operand type for unary {}: '{}'",
                            op,
                            v.type_name()
                        ))
                    }
                }
            }
            Expr::Binary(op, l, r) => {
                let a = self.eval(l)?;
                let b = self.eval(r)?;
                binary(op, &a, &b)?
            }
            Expr::Compare(first, ops) => {
                let mut left = self.eval(first)?;
                for (op, r) in ops {
                    let right = self.eval(r)?;
                    if !compare(op, &left, &right)? {
                        return Ok(Value::Bool(false));
                    }
                    left = right;
                }
                Value::Bool(true)
            }
            Expr::And(l, r) => {
                let a = self.eval(l)?;
                if !a.truthy() {
                    a
                } else {
                    self.eval(r)?
                }
            }
            Expr::Or(l, r) => {
                let a = self.eval(l)?;
                if a.truthy() {
                    a
                } else {
                    self.eval(r)?
                }
            }
            Expr::Not(inner) => Value::Bool(!self.eval(inner)?.truthy()),
            Expr::Cond(then, cond, otherwise) => {
                if self.eval(cond)?.truthy() {
                    self.eval(then)?
                } else {
                    match otherwise {
                        Some(o) => self.eval(o)?,
                        None => Value::undefined(Missing::Plain),
                    }
                }
            }
        })
    }

    fn call(&mut self, f: Value, args: EArgs) -> R<Value> {
        match f {
            Value::Macro(m) => self.call_macro(&m, args),
            Value::Builtin(b) => call_builtin(b, args),
            Value::Undefined(m) => fail(format!("UndefinedError: {}", m.message())),
            other => fail(format!(
                "TypeError: '{}' object is not callable",
                other.type_name()
            )),
        }
    }

    fn call_macro(&mut self, m: &MacroValue, args: EArgs) -> R<Value> {
        let def = &m.def;
        if args.pos.len() > def.params.len() {
            return fail(format!(
                "TypeError: macro '{}' takes not more than {} argument(s)",
                def.name,
                def.params.len()
            ));
        }
        if let Some((k, _)) = args
            .kw
            .iter()
            .find(|(k, _)| !def.params.iter().any(|(p, _)| p == k))
        {
            return fail(format!(
                "TypeError: macro '{}' takes no keyword argument '{}'",
                def.name, k
            ));
        }
        if self.macro_depth >= MAX_MACRO_DEPTH {
            return fail("RecursionError: maximum recursion depth exceeded (macro calls)");
        }
        // A macro sees its arguments, the scopes it was defined in and the template's
        // top-level variables, not its caller's.
        let saved = self.frames.split_off(1);
        self.frames.extend(m.closure.iter().cloned());
        if !m.closure.is_empty() {
            // The closure was taken before the macro's own name was bound in it; jinja2
            // resolves the name at call time, so the macro sees itself (recursion).
            let me = Value::Macro(Rc::new(MacroValue {
                def: Arc::clone(def),
                closure: m.closure.clone(),
            }));
            self.frames.push(vec![(def.name.clone(), me)]);
        }
        self.frames.push(Vec::new());
        self.macro_depth += 1;
        let result = (|| -> R<String> {
            for (i, (name, default)) in def.params.iter().enumerate() {
                let v = match args.get(i, name) {
                    Some(v) => v.clone(),
                    None => match default {
                        Some(d) => self.eval(d)?,
                        None => Value::undefined(Missing::Name(name.clone())),
                    },
                };
                self.assign(name, v);
            }
            let mut out = String::new();
            self.exec(&def.body, &mut out)?;
            Ok(out)
        })();
        self.macro_depth -= 1;
        self.frames.truncate(1);
        self.frames.extend(saved);
        Ok(Value::str(&result?))
    }

    fn call_method(&mut self, o: Value, name: &str, args: EArgs) -> R<Value> {
        if let Value::Markup(s) = &o {
            if STR_METHODS.contains(&name) {
                return markup_method(s, name, args);
            }
        }
        let o = o.plain();
        match &o {
            Value::Str(s) if STR_METHODS.contains(&name) => str_method(s, name, &args),
            Value::Dict(d) if DICT_METHODS.contains(&name) => dict_method(d, name, &args),
            Value::List(_) | Value::Tuple(_) if LIST_METHODS.contains(&name) => {
                list_method(&o, name, &args)
            }
            Value::Loop(info) if name == "cycle" => {
                if args.pos.is_empty() {
                    return fail("TypeError: no items for cycling given");
                }
                Ok(args.pos[info.index0 % args.pos.len()].clone())
            }
            _ => {
                let f = get_attr(&o, name)?;
                self.call(f, args)
            }
        }
    }

    fn filter(&mut self, v: Value, name: &str, args: &EArgs) -> R<Value> {
        crate::filters::apply(self, v, name, args)
    }

    /// Applies filter `name` (for `map`, `set` blocks).
    pub(crate) fn apply_filter(
        &mut self,
        v: Value,
        name: &str,
        pos: Vec<Value>,
        kw: Vec<(String, Value)>,
    ) -> R<Value> {
        let args = EArgs { pos, kw };
        self.filter(v, name, &args)
    }

    pub(crate) fn test(&mut self, v: &Value, name: &str, args: &EArgs) -> R<bool> {
        crate::filters::test(v, name, args)
    }

    /// Runs test `name` with positional `pos` (for `select`, `selectattr`).
    pub(crate) fn apply_test(&mut self, v: &Value, name: &str, pos: Vec<Value>) -> R<bool> {
        let args = EArgs {
            pos,
            kw: Vec::new(),
        };
        self.test(v, name, &args)
    }
}

fn call_builtin(b: Builtin, args: EArgs) -> R<Value> {
    match b {
        Builtin::RaiseException => {
            let msg = args
                .get(0, "message")
                .map(|v| v.to_str())
                .transpose()?
                .unwrap_or_default();
            Err(Fail::Raise(msg))
        }
        Builtin::StrftimeNow => {
            let fmt = args
                .str_arg(0, "format", "strftime_now's format")?
                .unwrap_or_default();
            Ok(Value::str(&crate::filters::strftime_now(&fmt)?))
        }
        Builtin::Namespace | Builtin::Dict => {
            let mut items: Vec<(String, Value)> = Vec::new();
            for a in &args.pos {
                match a {
                    Value::Dict(d) => items.extend(d.iter().cloned()),
                    Value::Namespace(n) => items.extend(n.borrow().iter().cloned()),
                    other => {
                        return fail(format!(
                            "TypeError: cannot build a namespace/dict from {}",
                            other.type_name()
                        ))
                    }
                }
            }
            for (k, v) in args.kw {
                match items.iter_mut().find(|(k2, _)| *k2 == k) {
                    Some(slot) => slot.1 = v,
                    None => items.push((k, v)),
                }
            }
            Ok(if b == Builtin::Dict {
                Value::Dict(Rc::new(items))
            } else {
                Value::Namespace(Rc::new(std::cell::RefCell::new(items)))
            })
        }
        Builtin::Range => {
            let ints: Vec<i64> = args
                .pos
                .iter()
                .map(|v| {
                    v.as_int().ok_or_else(|| {
                        format!(
                            "TypeError: '{}' object cannot be interpreted as an integer",
                            v.type_name()
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            let (start, stop, step) = match ints.as_slice() {
                [stop] => (0, *stop, 1),
                [start, stop] => (*start, *stop, 1),
                [start, stop, step] => (*start, *stop, *step),
                _ => return fail("TypeError: range expects 1 to 3 integer arguments"),
            };
            if step == 0 {
                return fail("ValueError: range() arg 3 must not be zero");
            }
            let mut out = Vec::new();
            let mut i = start;
            while (step > 0 && i < stop) || (step < 0 && i > stop) {
                if out.len() as i64 >= MAX_RANGE {
                    return fail(format!(
                        "OverflowError: range too big, maximum size for range is {}",
                        MAX_RANGE
                    ));
                }
                out.push(Value::Int(i));
                match i.checked_add(step) {
                    Some(next) => i = next,
                    None => break,
                }
            }
            Ok(Value::List(Rc::new(out)))
        }
    }
}

fn missing_attr(o: &Value, name: &str) -> Value {
    Value::undefined(Missing::Attr(
        format!("{} object", o.type_name()),
        name.to_string(),
    ))
}

/// `obj.name`: jinja2 tries the Python attribute first, then the item.
pub(crate) fn get_attr(o: &Value, name: &str) -> R<Value> {
    let o = &o.plain();
    if name.starts_with('_') {
        return fail(format!(
            "SecurityError: access to attribute '{}' of '{}' object is unsafe.",
            name,
            o.type_name()
        ));
    }
    match o {
        Value::Undefined(m) => fail(format!("UndefinedError: {}", m.message())),
        Value::Dict(d) => {
            if DICT_METHODS.contains(&name) {
                return fail(format!("the dict method '{}' used without calling it is not supported by shoal's template subset", name));
            }
            Ok(d.iter().find(|(k, _)| k == name).map_or_else(|| missing_attr(o, name), |(_, v)| v.clone()))
        }
        Value::Namespace(n) => Ok(n
            .borrow()
            .iter()
            .find(|(k, _)| k == name)
            .map_or_else(|| missing_attr(o, name), |(_, v)| v.clone())),
        Value::Loop(info) => Ok(match name {
            "index" => Value::Int(info.index0 as i64 + 1),
            "index0" => Value::Int(info.index0 as i64),
            "revindex" => Value::Int((info.length - info.index0) as i64),
            "revindex0" => Value::Int((info.length - info.index0 - 1) as i64),
            "first" => Value::Bool(info.index0 == 0),
            "last" => Value::Bool(info.index0 + 1 == info.length),
            "length" => Value::Int(info.length as i64),
            "depth" => Value::Int(1),
            "depth0" => Value::Int(0),
            "previtem" => info.prev.clone().unwrap_or_else(|| Value::undefined(Missing::Plain)),
            "nextitem" => info.next.clone().unwrap_or_else(|| Value::undefined(Missing::Plain)),
            _ => missing_attr(o, name),
        }),
        Value::Str(_) if STR_METHODS.contains(&name) => {
            fail(format!("the str method '{}' used without calling it is not supported by shoal's template subset", name))
        }
        Value::List(_) | Value::Tuple(_) if LIST_METHODS.contains(&name) => {
            fail(format!("the list method '{}' used without calling it is not supported by shoal's template subset", name))
        }
        _ => Ok(missing_attr(o, name)),
    }
}

fn norm_index(i: i64, len: usize) -> Option<usize> {
    let j = if i < 0 { i + len as i64 } else { i };
    (j >= 0 && (j as usize) < len).then_some(j as usize)
}

/// `obj[key]`: jinja2 tries the item first, then (for a string key) the attribute.
pub(crate) fn get_item(o: &Value, k: &Value) -> R<Value> {
    if let Value::Markup(_) = o {
        // markupsafe keeps a Markup's items and slices Markup.
        return Ok(match get_item(&o.plain(), k)? {
            Value::Str(s) => Value::Markup(s),
            other => other,
        });
    }
    let k = &k.plain();
    match (o, k) {
        (Value::Undefined(m), _) => fail(format!("UndefinedError: {}", m.message())),
        (Value::Dict(d), Value::Str(key)) => {
            match d.iter().find(|(k2, _)| k2.as_str() == key.as_ref()) {
                Some((_, v)) => Ok(v.clone()),
                None if DICT_METHODS.contains(&key.as_ref()) => get_attr(o, key),
                None => Ok(missing_attr(o, key)),
            }
        }
        (Value::List(l) | Value::Tuple(l), _) if k.as_int().is_some() => {
            let i = k.as_int().unwrap_or(0);
            Ok(norm_index(i, l.len())
                .map_or_else(|| Value::undefined(Missing::Plain), |j| l[j].clone()))
        }
        (Value::Str(s), _) if k.as_int().is_some() => {
            let chars: Vec<char> = s.chars().collect();
            let i = k.as_int().unwrap_or(0);
            Ok(norm_index(i, chars.len()).map_or_else(
                || Value::undefined(Missing::Plain),
                |j| Value::str(chars[j].encode_utf8(&mut [0; 4])),
            ))
        }
        (_, Value::Str(key)) => get_attr(o, key),
        _ => Ok(Value::undefined(Missing::Plain)),
    }
}

/// Python's slice semantics (`s[a:b:c]`, negative bounds and steps included).
fn slice(o: &Value, start: Option<i64>, stop: Option<i64>, step: Option<i64>) -> R<Value> {
    let step = step.unwrap_or(1);
    if step == 0 {
        return fail("ValueError: slice step cannot be zero");
    }
    let pick = |len: usize| -> Vec<usize> {
        let len = len as i64;
        let clamp = |b: Option<i64>, default: i64, lo: i64, hi: i64| -> i64 {
            match b {
                None => default,
                Some(x) => {
                    let x = if x < 0 { x + len } else { x };
                    x.clamp(lo, hi)
                }
            }
        };
        let mut idx = Vec::new();
        if step > 0 {
            let (a, b) = (clamp(start, 0, 0, len), clamp(stop, len, 0, len));
            let mut i = a;
            while i < b {
                idx.push(i as usize);
                i = i.saturating_add(step);
            }
        } else {
            let (a, b) = (
                clamp(start, len - 1, -1, len - 1),
                clamp(stop, -1, -1, len - 1),
            );
            let mut i = a;
            while i > b {
                idx.push(i as usize);
                i = i.saturating_add(step);
            }
        }
        idx
    };
    match o {
        Value::Str(s) | Value::Markup(s) => {
            let chars: Vec<char> = s.chars().collect();
            let text: Rc<str> = Rc::from(
                pick(chars.len())
                    .into_iter()
                    .map(|i| chars[i])
                    .collect::<String>(),
            );
            Ok(if matches!(o, Value::Markup(_)) {
                Value::Markup(text)
            } else {
                Value::Str(text)
            })
        }
        Value::List(l) => Ok(Value::List(Rc::new(
            pick(l.len()).into_iter().map(|i| l[i].clone()).collect(),
        ))),
        Value::Tuple(l) => Ok(Value::Tuple(Rc::new(
            pick(l.len()).into_iter().map(|i| l[i].clone()).collect(),
        ))),
        Value::Undefined(m) => fail(format!("UndefinedError: {}", m.message())),
        other => fail(format!(
            "TypeError: '{}' object is not subscriptable",
            other.type_name()
        )),
    }
}

/// markupsafe's `escape()` of a plain string.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The text a Markup operation takes from `v`: a Markup's as is, a plain string's escaped.
fn escaped_text(v: &Value) -> Option<String> {
    match v {
        Value::Markup(s) => Some(s.to_string()),
        Value::Str(s) => Some(html_escape(s)),
        _ => None,
    }
}

/// `+` and `*` where a Markup takes part (None: no Markup, the plain rules apply).
fn markup_binary(op: &str, a: &Value, b: &Value) -> R<Option<Value>> {
    if !matches!(a, Value::Markup(_)) && !matches!(b, Value::Markup(_)) {
        return Ok(None);
    }
    match op {
        "+" => match (escaped_text(a), escaped_text(b)) {
            (Some(x), Some(y)) => Ok(Some(Value::Markup(Rc::from(x + &y)))),
            _ => Ok(None),
        },
        "*" => Ok(match binary("*", &a.plain(), &b.plain())? {
            Value::Str(s) => Some(Value::Markup(s)),
            other => Some(other),
        }),
        _ => Ok(None),
    }
}

/// A str method called on a Markup: arguments escaped where markupsafe escapes them
/// (`replace`, `join`, `format`), string results Markup again.
fn markup_method(s: &Rc<str>, name: &str, mut args: EArgs) -> R<Value> {
    let escape_arg = |v: &Value| match v {
        Value::Str(x) => Value::str(&html_escape(x)),
        other => other.clone(),
    };
    match name {
        "replace" => args.pos = args.pos.iter().map(escape_arg).collect(),
        "format" => {
            args.pos = args.pos.iter().map(escape_arg).collect();
            args.kw = args
                .kw
                .iter()
                .map(|(k, v)| (k.clone(), escape_arg(v)))
                .collect();
        }
        "join" => {
            if let Some(items) = args.pos.first().cloned() {
                let escaped: Vec<Value> = items.iter_items()?.iter().map(escape_arg).collect();
                args.pos[0] = Value::List(Rc::new(escaped));
            }
        }
        _ => {}
    }
    let wrap = |v: Value| match v {
        Value::Str(x) => Value::Markup(x),
        other => other,
    };
    Ok(match str_method(s, name, &args)? {
        Value::List(items) => Value::List(Rc::new(items.iter().cloned().map(wrap).collect())),
        other => wrap(other),
    })
}

fn int_overflow() -> Fail {
    Fail::from("OverflowError: integer result out of shoal-template's 64-bit range".to_string())
}

fn type_error(op: &str, a: &Value, b: &Value) -> Fail {
    if op == "+" {
        if let Value::Str(_) = a {
            return Fail::from(format!(
                "TypeError: can only concatenate str (not \"{}\") to str",
                b.type_name()
            ));
        }
        if let (Value::List(_), _) = (a, b) {
            return Fail::from(format!(
                "TypeError: can only concatenate list (not \"{}\") to list",
                b.type_name()
            ));
        }
    }
    Fail::from(format!(
        "TypeError: unsupported operand type(s) for {}: '{}' and '{}'",
        op,
        a.type_name(),
        b.type_name()
    ))
}

fn floor_div(a: i64, b: i64) -> Option<i64> {
    let q = a.checked_div(b)?;
    Some(if (a % b != 0) && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    })
}

/// Python's float `%`: the result takes the divisor's sign (a zero too).
fn py_mod_f(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r == 0.0 {
        0.0f64.copysign(b)
    } else if (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}

/// Python's float `//` (CPython's float_floor_div: from fmod, not floor(x / y), so that
/// `7.0 // 0.1` is 69.0 as in Python).
fn py_floor_div_f(x: f64, y: f64) -> f64 {
    let m = x % y;
    let mut div = (x - m) / y;
    if m != 0.0 && ((y < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let floored = div.floor();
        if div - floored > 0.5 {
            floored + 1.0
        } else {
            floored
        }
    } else {
        0.0f64.copysign(x / y)
    }
}

/// Python's float `**`, with its errors where Rust would give inf or NaN.
fn py_pow_f(x: f64, y: f64) -> R<f64> {
    if x == 0.0 && y < 0.0 {
        return fail("ZeroDivisionError: 0.0 cannot be raised to a negative power");
    }
    if x < 0.0 && y.is_finite() && y.fract() != 0.0 {
        return fail("a complex result of '**' is not supported by shoal's template subset");
    }
    let r = x.powf(y);
    if r.is_infinite() && x.is_finite() && y.is_finite() {
        return fail("OverflowError: (34, 'Numerical result out of range')");
    }
    Ok(r)
}

/// How deeply containers may nest in values a template builds (as deep as serde_json
/// parses its input): deeper values would overflow the stack when printed or dropped.
const MAX_VALUE_NESTING: usize = 128;

/// Whether `v` is nested deeper than `budget` containers.
fn too_deep(v: &Value, budget: usize) -> bool {
    fn any<'a>(mut items: impl Iterator<Item = &'a Value>, budget: usize) -> bool {
        budget == 0 || items.any(|x| too_deep(x, budget - 1))
    }
    match v {
        Value::List(l) | Value::Tuple(l) | Value::View(_, l) => any(l.iter(), budget),
        Value::Dict(d) => any(d.iter().map(|(_, x)| x), budget),
        Value::Namespace(n) => any(n.borrow().iter().map(|(_, x)| x), budget),
        Value::Gen(g) => any(g.borrow().iter(), budget),
        _ => false,
    }
}

/// `Err` when a container of `items` would nest deeper than MAX_VALUE_NESTING.
fn check_nesting(items: &[Value]) -> R<()> {
    if items.iter().any(|x| too_deep(x, MAX_VALUE_NESTING - 1)) {
        return fail(format!(
            "values nested over {} deep are not supported by shoal's template subset",
            MAX_VALUE_NESTING
        ));
    }
    Ok(())
}

fn contains_namespace(v: &Value, budget: usize) -> bool {
    match v {
        Value::Namespace(_) => true,
        Value::List(l) | Value::Tuple(l) | Value::View(_, l) => {
            budget > 0 && l.iter().any(|x| contains_namespace(x, budget - 1))
        }
        Value::Dict(d) => budget > 0 && d.iter().any(|(_, x)| contains_namespace(x, budget - 1)),
        Value::Gen(g) => budget > 0 && g.borrow().iter().any(|x| contains_namespace(x, budget - 1)),
        _ => false,
    }
}

fn check_repeat(len: usize, times: i64) -> R<()> {
    if (len as i64).saturating_mul(times.max(0)) > MAX_REPEAT_ITEMS {
        return fail(format!(
            "MemoryError: a '*' result over {} items is not supported by shoal's template subset",
            MAX_REPEAT_ITEMS
        ));
    }
    Ok(())
}

fn repeat(items: &[Value], n: i64) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..n.max(0) {
        out.extend(items.iter().cloned());
    }
    out
}

pub(crate) fn binary(op: &str, a: &Value, b: &Value) -> R<Value> {
    if op == "~" {
        return Ok(Value::str(&format!("{}{}", a.to_str()?, b.to_str()?)));
    }
    if let Some(v) = markup_binary(op, a, b)? {
        return Ok(v);
    }
    let (a, b) = (&a.plain(), &b.plain());
    for v in [a, b] {
        if let Value::Undefined(m) = v {
            return fail(format!("UndefinedError: {}", m.message()));
        }
    }
    // Integer arithmetic where both sides are ints (bools count), float otherwise.
    if let (Some(x), Some(y)) = (a.as_int(), b.as_int()) {
        return Ok(match op {
            "+" => Value::Int(x.checked_add(y).ok_or_else(int_overflow)?),
            "-" => Value::Int(x.checked_sub(y).ok_or_else(int_overflow)?),
            "*" => Value::Int(x.checked_mul(y).ok_or_else(int_overflow)?),
            "/" => {
                if y == 0 {
                    return fail("ZeroDivisionError: division by zero");
                }
                Value::Float(x as f64 / y as f64)
            }
            "//" => {
                if y == 0 {
                    return fail("ZeroDivisionError: integer division or modulo by zero");
                }
                Value::Int(floor_div(x, y).ok_or_else(int_overflow)?)
            }
            "%" => {
                if y == 0 {
                    return fail("ZeroDivisionError: integer division or modulo by zero");
                }
                let r = x.checked_rem(y).ok_or_else(int_overflow)?;
                Value::Int(if r != 0 && ((r < 0) != (y < 0)) {
                    r + y
                } else {
                    r
                })
            }
            "**" => {
                if y < 0 {
                    Value::Float(py_pow_f(x as f64, y as f64)?)
                } else {
                    let e = u32::try_from(y).map_err(|_| int_overflow())?;
                    Value::Int(x.checked_pow(e).ok_or_else(int_overflow)?)
                }
            }
            _ => return fail(format!("unknown operator {}", op)),
        });
    }
    if let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) {
        let zero = y == 0.0 && matches!(op, "/" | "//" | "%");
        if zero {
            return fail("ZeroDivisionError: float division by zero");
        }
        return Ok(Value::Float(match op {
            "+" => x + y,
            "-" => x - y,
            "*" => x * y,
            "/" => x / y,
            "//" => py_floor_div_f(x, y),
            "%" => py_mod_f(x, y),
            "**" => py_pow_f(x, y)?,
            _ => return fail(format!("unknown operator {}", op)),
        }));
    }
    match (op, a, b) {
        ("+", Value::Str(x), Value::Str(y)) => Ok(Value::str(&format!("{}{}", x, y))),
        ("+", Value::List(x), Value::List(y)) => Ok(Value::List(Rc::new(
            x.iter().chain(y.iter()).cloned().collect(),
        ))),
        ("+", Value::Tuple(x), Value::Tuple(y)) => Ok(Value::Tuple(Rc::new(
            x.iter().chain(y.iter()).cloned().collect(),
        ))),
        ("*", Value::Str(s), n) | ("*", n, Value::Str(s)) if n.as_int().is_some() => {
            let times = n.as_int().unwrap_or(0).max(0);
            check_repeat(s.chars().count(), times)?;
            Ok(Value::str(&s.repeat(times as usize)))
        }
        ("*", Value::List(l), n) | ("*", n, Value::List(l)) if n.as_int().is_some() => {
            let times = n.as_int().unwrap_or(0);
            check_repeat(l.len(), times)?;
            Ok(Value::List(Rc::new(repeat(l, times))))
        }
        ("%", Value::Str(_), _) => {
            fail("string formatting with '%' is not supported by shoal's template subset")
        }
        _ => Err(type_error(op, a, b)),
    }
}

pub(crate) fn contains(container: &Value, item: &Value) -> R<bool> {
    let (container, item) = (&container.plain(), &item.plain());
    match container {
        Value::Str(s) => match item {
            Value::Str(i) => Ok(s.contains(i.as_ref())),
            other => fail(format!(
                "TypeError: 'in <string>' requires string as left operand, not {}",
                other.type_name()
            )),
        },
        Value::List(l) | Value::Tuple(l) => Ok(l.iter().any(|v| py_eq(v, item))),
        Value::View(_, l) => Ok(l.iter().any(|v| py_eq(v, item))),
        Value::Gen(g) => {
            // Like Python, membership consumes the iterator up to the match.
            let mut items = g.borrow_mut();
            match items.iter().position(|v| py_eq(v, item)) {
                Some(i) => {
                    items.drain(..=i);
                    Ok(true)
                }
                None => {
                    items.clear();
                    Ok(false)
                }
            }
        }
        Value::Dict(d) => Ok(match item {
            Value::Str(i) => d.iter().any(|(k, _)| k.as_str() == i.as_ref()),
            Value::List(_)
            | Value::Dict(_)
            | Value::Namespace(_)
            | Value::Gen(_)
            | Value::View(..) => {
                return fail(format!(
                    "TypeError: unhashable type: '{}'",
                    item.type_name()
                ))
            }
            _ => false,
        }),
        Value::Namespace(n) => Ok(match item {
            Value::Str(i) => n.borrow().iter().any(|(k, _)| k.as_str() == i.as_ref()),
            _ => false,
        }),
        Value::Undefined(_) => Ok(false),
        other => fail(format!(
            "TypeError: argument of type '{}' is not iterable",
            other.type_name()
        )),
    }
}

pub(crate) fn compare(op: &str, a: &Value, b: &Value) -> R<bool> {
    use std::cmp::Ordering::*;
    Ok(match op {
        "==" => py_eq(a, b),
        "!=" => !py_eq(a, b),
        "in" => contains(b, a)?,
        "not in" => !contains(b, a)?,
        _ => {
            if let Value::Undefined(m) = a {
                return fail(format!("UndefinedError: {}", m.message()));
            }
            if let Value::Undefined(m) = b {
                return fail(format!("UndefinedError: {}", m.message()));
            }
            let ord =
                py_cmp(a, b).map_err(|e| Fail::from(e.replace("'<'", &format!("'{}'", op))))?;
            match op {
                "<" => ord == Less,
                "<=" => ord != Greater,
                ">" => ord == Greater,
                ">=" => ord != Less,
                _ => return fail(format!("unknown comparison {}", op)),
            }
        }
    })
}

fn py_split_whitespace(s: &str, maxsplit: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut rest = s.trim_start_matches(crate::lexer::is_py_space);
    while !rest.is_empty() {
        if maxsplit >= 0 && out.len() as i64 >= maxsplit {
            out.push(Value::str(rest));
            break;
        }
        let end = rest.find(crate::lexer::is_py_space).unwrap_or(rest.len());
        out.push(Value::str(&rest[..end]));
        rest = rest[end..].trim_start_matches(crate::lexer::is_py_space);
    }
    out
}

fn strip_with(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let is_strip = |c: char| match chars {
        Some(set) => set.contains(c),
        None => crate::lexer::is_py_space(c),
    };
    let mut t = s;
    if left {
        t = t.trim_start_matches(is_strip);
    }
    if right {
        t = t.trim_end_matches(is_strip);
    }
    t.to_string()
}

/// Unicode's titlecase letters (category Lt): cased, yet neither upper nor lower case.
fn is_titlecase_letter(c: char) -> bool {
    matches!(c as u32, 0x1c5 | 0x1c8 | 0x1cb | 0x1f2 | 0x1f88..=0x1f8f | 0x1f98..=0x1f9f | 0x1fa8..=0x1faf | 0x1fbc | 0x1fcc | 0x1ffc)
}

/// The titlecase mapping Python's `str.title()`/`capitalize()` use for a word's first
/// letter: the uppercase one except for digraphs and ligatures (`ǆ` -> `ǅ`, `ß` -> `Ss`).
fn push_titlecase(c: char, out: &mut String) {
    let special = match c {
        'Ǆ' | 'ǅ' | 'ǆ' => "ǅ",
        'Ǉ' | 'ǈ' | 'ǉ' => "ǈ",
        'Ǌ' | 'ǋ' | 'ǌ' => "ǋ",
        'Ǳ' | 'ǲ' | 'ǳ' => "ǲ",
        'ß' => "Ss",
        'ﬀ' => "Ff",
        'ﬁ' => "Fi",
        'ﬂ' => "Fl",
        'ﬃ' => "Ffi",
        'ﬄ' => "Ffl",
        'ﬅ' | 'ﬆ' => "St",
        'և' => "Եւ",
        _ if is_titlecase_letter(c) => {
            out.push(c);
            return;
        }
        _ => {
            out.extend(c.to_uppercase());
            return;
        }
    };
    out.push_str(special);
}

/// Python's `str.title()`: a cased character after an uncased one starts a word.
fn py_title(s: &str) -> String {
    let mut out = String::new();
    let mut prev_cased = false;
    for c in s.chars() {
        let cased = c.is_lowercase() || c.is_uppercase() || is_titlecase_letter(c);
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            push_titlecase(c, &mut out);
        }
        prev_cased = cased;
    }
    out
}

/// Python's `str.capitalize()`: the first character titlecased, the rest lowercased.
pub(crate) fn py_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    let mut out = String::with_capacity(s.len());
    if let Some(first) = chars.next() {
        push_titlecase(first, &mut out);
        // Lowercased as a string, so that a final sigma becomes 'ς' as in Python.
        out.push_str(&chars.as_str().to_lowercase());
    }
    out
}

/// Python's `str.splitlines()` boundaries.
pub(crate) fn py_splitlines(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(std::mem::take(&mut cur));
            }
            '\n' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn str_method(s: &str, name: &str, args: &EArgs) -> R<Value> {
    let arg_str = |i: usize, n: &str| args.str_arg(i, n, &format!("str.{}() argument", name));
    Ok(match name {
        "strip" | "lstrip" | "rstrip" => {
            let chars = arg_str(0, "chars")?;
            Value::str(&strip_with(
                s,
                chars.as_deref(),
                name != "rstrip",
                name != "lstrip",
            ))
        }
        "startswith" | "endswith" => {
            let prefixes: Vec<String> =
                match args.get(0, "prefix").or_else(|| args.get(0, "suffix")) {
                    Some(Value::Str(p) | Value::Markup(p)) => vec![p.to_string()],
                    Some(Value::Tuple(t)) | Some(Value::List(t)) => {
                        t.iter().map(|v| v.to_str()).collect::<Result<_, _>>()?
                    }
                    _ => {
                        return fail(format!(
                            "TypeError: {} first arg must be str or a tuple of str",
                            name
                        ))
                    }
                };
            if args.pos.len() > 1 {
                return fail(format!(
                    "str.{}() with start/end is not supported by shoal's template subset",
                    name
                ));
            }
            Value::Bool(prefixes.iter().any(|p| {
                if name == "startswith" {
                    s.starts_with(p.as_str())
                } else {
                    s.ends_with(p.as_str())
                }
            }))
        }
        "split" | "rsplit" => {
            let sep = arg_str(0, "sep")?;
            let maxsplit = args
                .get(1, "maxsplit")
                .and_then(Value::as_int)
                .unwrap_or(-1);
            let parts: Vec<Value> = match sep {
                None if name == "split" => py_split_whitespace(s, maxsplit),
                None => {
                    if maxsplit >= 0 {
                        return fail("str.rsplit() with maxsplit and no separator is not supported by shoal's template subset");
                    }
                    py_split_whitespace(s, -1)
                }
                Some(sep) if sep.is_empty() => return fail("ValueError: empty separator"),
                Some(sep) => {
                    if maxsplit < 0 {
                        s.split(sep.as_str()).map(Value::str).collect()
                    } else if name == "split" {
                        s.splitn(maxsplit as usize + 1, sep.as_str())
                            .map(Value::str)
                            .collect()
                    } else {
                        let mut v: Vec<Value> = s
                            .rsplitn(maxsplit as usize + 1, sep.as_str())
                            .map(Value::str)
                            .collect();
                        v.reverse();
                        v
                    }
                }
            };
            Value::List(Rc::new(parts))
        }
        "upper" => Value::str(&s.to_uppercase()),
        "lower" => Value::str(&s.to_lowercase()),
        "title" => Value::str(&py_title(s)),
        "capitalize" => Value::str(&py_capitalize(s)),
        "replace" => {
            let old = arg_str(0, "old")?.unwrap_or_default();
            let new = arg_str(1, "new")?.unwrap_or_default();
            let count = args.get(2, "count").and_then(Value::as_int).unwrap_or(-1);
            Value::str(&if count < 0 {
                s.replace(&old, &new)
            } else {
                s.replacen(&old, &new, count as usize)
            })
        }
        "find" => {
            let sub = arg_str(0, "sub")?.unwrap_or_default();
            Value::Int(s.find(&sub).map_or(-1, |b| s[..b].chars().count() as i64))
        }
        "count" => {
            let sub = arg_str(0, "sub")?.unwrap_or_default();
            Value::Int(if sub.is_empty() {
                s.chars().count() as i64 + 1
            } else {
                s.matches(&sub).count() as i64
            })
        }
        "join" => {
            let items = args
                .get(0, "iterable")
                .cloned()
                .unwrap_or(Value::List(Rc::new(Vec::new())))
                .iter_items()?;
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::Str(x) | Value::Markup(x) => parts.push(x.to_string()),
                    other => {
                        return fail(format!(
                            "TypeError: sequence item: expected str instance, {} found",
                            other.type_name()
                        ))
                    }
                }
            }
            Value::str(&parts.join(s))
        }
        "splitlines" => Value::List(Rc::new(
            py_splitlines(s).iter().map(|l| Value::str(l)).collect(),
        )),
        "isdigit" => Value::Bool(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
        "isalpha" => Value::Bool(!s.is_empty() && s.chars().all(char::is_alphabetic)),
        "isspace" => Value::Bool(!s.is_empty() && s.chars().all(crate::lexer::is_py_space)),
        "format" => Value::str(&py_format(s, args)?),
        _ => {
            return fail(format!(
                "the str method '{}' is not supported by shoal's template subset",
                name
            ))
        }
    })
}

/// Python's `str.format` for plain replacement fields (`{}`, `{0}`, `{name}`, `{{`, `}}`),
/// each value as `str()` gives it; conversions, format specs and field lookups are refused.
fn py_format(s: &str, args: &EArgs) -> R<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    let mut auto = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return fail("ValueError: Single '}' encountered in format string"),
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => field.push(ch),
                        None => return fail("ValueError: expected '}' before end of string"),
                    }
                }
                if field.contains(['!', ':', '.', '[', '{']) {
                    return fail(format!(
                        "str.format field {{{}}} is not supported by shoal's template subset",
                        field
                    ));
                }
                let value = if field.is_empty() {
                    auto += 1;
                    args.pos.get(auto - 1)
                } else if let Ok(i) = field.parse::<usize>() {
                    args.pos.get(i)
                } else {
                    args.kw.iter().find(|(k, _)| *k == field).map(|(_, v)| v)
                };
                match value {
                    Some(v) => out.push_str(&v.to_str()?),
                    None => {
                        return fail(format!(
                            "IndexError/KeyError: no argument for {{{}}}",
                            field
                        ))
                    }
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn dict_method(d: &Rc<Vec<(String, Value)>>, name: &str, args: &EArgs) -> R<Value> {
    Ok(match name {
        "get" => {
            let default = args.get(1, "default").cloned().unwrap_or(Value::None);
            match args.get(0, "key") {
                Some(Value::Str(k) | Value::Markup(k)) => d
                    .iter()
                    .find(|(k2, _)| k2.as_str() == k.as_ref())
                    .map_or(default, |(_, v)| v.clone()),
                Some(_) => default,
                None => return fail("TypeError: get expected at least 1 argument, got 0"),
            }
        }
        "items" => Value::View(
            "dict_items",
            Rc::new(
                d.iter()
                    .map(|(k, v)| Value::Tuple(Rc::new(vec![Value::str(k), v.clone()])))
                    .collect(),
            ),
        ),
        "keys" => Value::View(
            "dict_keys",
            Rc::new(d.iter().map(|(k, _)| Value::str(k)).collect()),
        ),
        "values" => Value::View(
            "dict_values",
            Rc::new(d.iter().map(|(_, v)| v.clone()).collect()),
        ),
        "copy" => Value::Dict(Rc::clone(d)),
        _ => {
            return fail(format!(
                "SecurityError: access to attribute '{}' of 'dict' object is unsafe.",
                name
            ))
        }
    })
}

fn list_method(o: &Value, name: &str, args: &EArgs) -> R<Value> {
    let items = o.iter_items()?;
    Ok(match name {
        "index" => {
            let x = args.get(0, "value").cloned().unwrap_or(Value::None);
            match items.iter().position(|v| py_eq(v, &x)) {
                Some(i) => Value::Int(i as i64),
                None => return fail("ValueError: value is not in list"),
            }
        }
        "count" => {
            let x = args.get(0, "value").cloned().unwrap_or(Value::None);
            Value::Int(items.iter().filter(|v| py_eq(v, &x)).count() as i64)
        }
        "copy" => Value::List(Rc::new(items)),
        // The immutable sandbox refuses every method that modifies a list.
        _ => {
            return fail(format!(
                "SecurityError: access to attribute '{}' of '{}' object is unsafe.",
                name,
                o.type_name()
            ))
        }
    })
}
