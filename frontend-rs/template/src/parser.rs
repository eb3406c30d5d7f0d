//! Tokens -> a tree of statements and expressions, following jinja2's grammar and operator
//! precedence. Whatever is outside shoal's subset fails here, naming the construct and line.

use crate::lexer::{Spanned, Tok};

/// A literal constant (kept apart from runtime values so that a compiled template is
/// `Send + Sync` and can be shared across threads).
#[derive(Debug, Clone)]
pub enum Lit {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

#[derive(Debug, Clone)]
pub enum Expr {
    Const(Lit),
    Name(String),
    List(Vec<Expr>),
    Tuple(Vec<Expr>),
    Dict(Vec<(Expr, Expr)>),
    /// `a.b` (jinja2's getattr: attribute first, then item).
    Attr(Box<Expr>, String),
    /// `a[b]` (getitem: item first).
    Item(Box<Expr>, Box<Expr>),
    Slice(
        Box<Expr>,
        Option<Box<Expr>>,
        Option<Box<Expr>>,
        Option<Box<Expr>>,
    ),
    Call(Box<Expr>, Args),
    Filter(Box<Expr>, String, Args),
    Test(Box<Expr>, String, Args),
    Unary(&'static str, Box<Expr>),
    Binary(&'static str, Box<Expr>, Box<Expr>),
    /// A comparison chain `a < b <= c`, evaluated like Python's.
    Compare(Box<Expr>, Vec<(&'static str, Expr)>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    /// `then if cond else otherwise` (`otherwise` absent: undefined).
    Cond(Box<Expr>, Box<Expr>, Option<Box<Expr>>),
}

/// An expression with the line it starts on, for error messages.
#[derive(Debug, Clone)]
pub struct LExpr {
    pub expr: Expr,
    pub line: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Args {
    pub pos: Vec<Expr>,
    pub kw: Vec<(String, Expr)>,
}

/// Where `for` and `set` put values.
#[derive(Debug, Clone)]
pub enum Target {
    Name(String),
    Tuple(Vec<String>),
    /// `ns.attr` (a namespace() attribute).
    Attr(String, String),
}

#[derive(Debug)]
pub struct MacroDef {
    pub name: String,
    pub params: Vec<(String, Option<Expr>)>,
    pub body: Vec<Node>,
}

#[derive(Debug)]
pub enum Node {
    Text(String),
    Output(LExpr),
    If(Vec<(LExpr, Vec<Node>)>, Vec<Node>),
    For {
        target: Target,
        iter: LExpr,
        filter: Option<LExpr>,
        body: Vec<Node>,
        else_body: Vec<Node>,
        line: usize,
    },
    Set(Target, LExpr),
    SetBlock(String, Vec<Node>, Vec<(String, Args)>, usize),
    Macro(std::sync::Arc<MacroDef>),
    Break,
    Continue,
}

/// Filters the evaluator implements (checked here so that an unknown one fails compile).
pub const FILTERS: &[&str] = &[
    "abs",
    "capitalize",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "sort",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "wordcount",
];

/// Tests the evaluator implements.
pub const TESTS: &[&str] = &[
    "boolean",
    "callable",
    "defined",
    "divisibleby",
    "eq",
    "equalto",
    "even",
    "false",
    "float",
    "ge",
    "greaterthan",
    "gt",
    "in",
    "integer",
    "iterable",
    "le",
    "lessthan",
    "lower",
    "lt",
    "mapping",
    "ne",
    "none",
    "number",
    "odd",
    "sameas",
    "sequence",
    "string",
    "true",
    "undefined",
    "upper",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
];

/// jinja2's own filters and tests: a name outside these is unknown to Python too.
const JINJA_FILTERS: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "capitalize",
    "center",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "filesizeformat",
    "first",
    "float",
    "forceescape",
    "format",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "random",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "slice",
    "sort",
    "string",
    "striptags",
    "sum",
    "title",
    "tojson",
    "trim",
    "truncate",
    "unique",
    "upper",
    "urlencode",
    "urlize",
    "wordcount",
    "wordwrap",
    "xmlattr",
];
const JINJA_TESTS: &[&str] = &[
    "!=",
    "<",
    "<=",
    "==",
    ">",
    ">=",
    "boolean",
    "callable",
    "defined",
    "divisibleby",
    "eq",
    "equalto",
    "escaped",
    "even",
    "false",
    "filter",
    "float",
    "ge",
    "greaterthan",
    "gt",
    "in",
    "integer",
    "iterable",
    "le",
    "lessthan",
    "lower",
    "lt",
    "mapping",
    "ne",
    "none",
    "number",
    "odd",
    "sameas",
    "sequence",
    "string",
    "test",
    "true",
    "undefined",
    "upper",
];

/// The filter and test names a template uses, checked as jinja2 compiles them: one that
/// jinja2 has but shoal-template lacks fails anywhere (it could run); one jinja2 does not
/// know fails too, except in an `if` or a conditional expression (a "soft" place), where
/// jinja2 defers the error to the moment it runs, and so does the renderer.
fn check_nodes(nodes: &[Node], soft: bool) -> Result<(), String> {
    for node in nodes {
        match node {
            Node::Text(_) | Node::Break | Node::Continue => {}
            Node::Output(e) | Node::Set(_, e) => check_expr(&e.expr, e.line, soft)?,
            Node::If(branches, else_body) => {
                for (cond, body) in branches {
                    check_expr(&cond.expr, cond.line, true)?;
                    check_nodes(body, true)?;
                }
                check_nodes(else_body, true)?;
            }
            Node::For {
                iter,
                filter,
                body,
                else_body,
                ..
            } => {
                check_expr(&iter.expr, iter.line, soft)?;
                if let Some(f) = filter {
                    check_expr(&f.expr, f.line, false)?;
                }
                check_nodes(body, false)?;
                check_nodes(else_body, false)?;
            }
            Node::SetBlock(_, body, filters, line) => {
                check_nodes(body, false)?;
                for (name, args) in filters {
                    check_name(name, true, *line, false)?;
                    check_args(args, *line, false)?;
                }
            }
            Node::Macro(def) => {
                for (_, default) in &def.params {
                    if let Some(d) = default {
                        check_expr(d, 0, false)?;
                    }
                }
                check_nodes(&def.body, false)?;
            }
        }
    }
    Ok(())
}

fn check_name(name: &str, is_filter: bool, line: usize, soft: bool) -> Result<(), String> {
    let (ours, jinja, what) = if is_filter {
        (FILTERS, JINJA_FILTERS, "filter")
    } else {
        (TESTS, JINJA_TESTS, "test")
    };
    if ours.contains(&name) || (soft && !jinja.contains(&name)) {
        return Ok(());
    }
    if jinja.contains(&name) {
        return Err(unsupported(line, &format!("the {} '{}'", what, name)));
    }
    Err(format!("line {}: no {} named '{}'", line, what, name))
}

fn check_args(args: &Args, line: usize, soft: bool) -> Result<(), String> {
    for a in args.pos.iter().chain(args.kw.iter().map(|(_, a)| a)) {
        check_expr(a, line, soft)?;
    }
    Ok(())
}

fn check_expr(e: &Expr, line: usize, soft: bool) -> Result<(), String> {
    match e {
        Expr::Const(_) | Expr::Name(_) => Ok(()),
        Expr::List(items) | Expr::Tuple(items) => {
            items.iter().try_for_each(|i| check_expr(i, line, soft))
        }
        Expr::Dict(pairs) => pairs.iter().try_for_each(|(k, v)| {
            check_expr(k, line, soft)?;
            check_expr(v, line, soft)
        }),
        Expr::Attr(inner, _) | Expr::Unary(_, inner) | Expr::Not(inner) => {
            check_expr(inner, line, soft)
        }
        Expr::Item(a, b) | Expr::Binary(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
            check_expr(a, line, soft)?;
            check_expr(b, line, soft)
        }
        Expr::Slice(obj, a, b, c) => {
            check_expr(obj, line, soft)?;
            [a, b, c]
                .into_iter()
                .flatten()
                .try_for_each(|x| check_expr(x, line, soft))
        }
        Expr::Call(f, args) => {
            check_expr(f, line, soft)?;
            check_args(args, line, soft)
        }
        Expr::Filter(inner, name, args) | Expr::Test(inner, name, args) => {
            check_name(name, matches!(e, Expr::Filter(..)), line, soft)?;
            check_expr(inner, line, soft)?;
            check_args(args, line, soft)
        }
        Expr::Compare(first, ops) => {
            check_expr(first, line, soft)?;
            ops.iter().try_for_each(|(_, x)| check_expr(x, line, soft))
        }
        // A conditional expression is a soft place, all three parts of it.
        Expr::Cond(then, cond, otherwise) => {
            check_expr(then, line, true)?;
            check_expr(cond, line, true)?;
            otherwise.iter().try_for_each(|x| check_expr(x, line, true))
        }
    }
}

pub fn parse(tokens: Vec<Spanned>) -> Result<Vec<Node>, String> {
    let mut p = Parser {
        toks: tokens,
        pos: 0,
        loop_depth: 0,
        nesting: 0,
    };
    let (nodes, end) = p.nodes(&[])?;
    if let Some(end) = end {
        return Err(format!("line {}: unexpected `{{% {} %}}`", p.line(), end));
    }
    check_nodes(&nodes, false)?;
    Ok(nodes)
}

struct Parser {
    toks: Vec<Spanned>,
    pos: usize,
    /// For-loop bodies enclosing the cursor (within the current macro): where `break` and
    /// `continue` are allowed, as in the Python jinja2 compiles to.
    loop_depth: usize,
    /// Nesting of blocks and expressions being parsed: bounded, so that a pathological
    /// template is an error rather than a stack overflow.
    nesting: usize,
}

/// The deepest nesting of blocks plus expressions compile accepts.
const MAX_NESTING: usize = 200;

fn unsupported(line: usize, what: &str) -> String {
    format!(
        "line {}: {} is not supported by shoal's template subset",
        line, what
    )
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|s| &s.tok)
    }

    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n).map(|s| &s.tok)
    }

    fn line(&self) -> usize {
        self.toks
            .get(self.pos)
            .or_else(|| self.toks.last())
            .map_or(1, |s| s.line)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|s| s.tok.clone());
        self.pos += 1;
        t
    }

    fn err<T>(&self, what: impl AsRef<str>) -> Result<T, String> {
        Err(format!("line {}: {}", self.line(), what.as_ref()))
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Some(Tok::Op(o)) if *o == op)
    }

    fn is_name(&self, name: &str) -> bool {
        matches!(self.peek(), Some(Tok::Name(n)) if n == name)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        let yes = self.is_op(op);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn eat_name(&mut self, name: &str) -> bool {
        let yes = self.is_name(name);
        if yes {
            self.pos += 1;
        }
        yes
    }

    fn expect_op(&mut self, op: &str) -> Result<(), String> {
        if self.eat_op(op) {
            Ok(())
        } else {
            self.err(format!("expected '{}', found {}", op, self.describe()))
        }
    }

    fn expect(&mut self, tok: Tok, what: &str) -> Result<(), String> {
        if self.peek() == Some(&tok) {
            self.pos += 1;
            Ok(())
        } else {
            self.err(format!("expected {}, found {}", what, self.describe()))
        }
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => "the end of the template".into(),
            Some(Tok::Text(_)) => "template text".into(),
            Some(Tok::BlockBegin) => "'{%'".into(),
            Some(Tok::BlockEnd) => "'%}'".into(),
            Some(Tok::VarBegin) => "'{{'".into(),
            Some(Tok::VarEnd) => "'}}'".into(),
            Some(Tok::Name(n)) => format!("'{}'", n),
            Some(Tok::Str(s)) => format!("string {:?}", s),
            Some(Tok::Int(i)) => format!("{}", i),
            Some(Tok::Float(f)) => format!("{}", f),
            Some(Tok::Op(o)) => format!("'{}'", o),
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(Tok::Name(n)) => {
                let n = n.clone();
                self.pos += 1;
                Ok(n)
            }
            _ => self.err(format!("expected a name, found {}", self.describe())),
        }
    }

    /// Nodes up to a block whose keyword is in `ends` (consumed through the keyword, the
    /// rest of that tag left to the caller); `None` at the end of the template.
    fn nodes(&mut self, ends: &[&str]) -> Result<(Vec<Node>, Option<String>), String> {
        self.enter()?;
        let result = self.nodes_inner(ends);
        self.nesting -= 1;
        result
    }

    fn enter(&mut self) -> Result<(), String> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            self.nesting -= 1;
            return self.err(format!(
                "blocks and expressions nested over {} deep",
                MAX_NESTING
            ));
        }
        Ok(())
    }

    fn nodes_inner(&mut self, ends: &[&str]) -> Result<(Vec<Node>, Option<String>), String> {
        let mut nodes = Vec::new();
        while let Some(tok) = self.next() {
            match tok {
                Tok::Text(t) => nodes.push(Node::Text(t)),
                Tok::VarBegin => {
                    let e = self.lexpr_tuple()?;
                    self.expect(Tok::VarEnd, "'}}'")?;
                    nodes.push(Node::Output(e));
                }
                Tok::BlockBegin => {
                    let line = self.line();
                    let kw = self.ident()?;
                    if ends.contains(&kw.as_str()) {
                        return Ok((nodes, Some(kw)));
                    }
                    nodes.push(self.statement(&kw, line)?);
                }
                _ => return self.err("unexpected token outside a tag"),
            }
        }
        if !ends.is_empty() {
            return self.err(format!("missing `{{% {} %}}`", ends[ends.len() - 1]));
        }
        Ok((nodes, None))
    }

    fn block_end(&mut self) -> Result<(), String> {
        self.expect(Tok::BlockEnd, "'%}'")
    }

    fn statement(&mut self, kw: &str, line: usize) -> Result<Node, String> {
        match kw {
            "if" => self.if_stmt(),
            "for" => self.for_stmt(line),
            "set" => self.set_stmt(line),
            "macro" => self.macro_stmt(),
            "break" | "continue" => {
                if self.loop_depth == 0 {
                    return Err(format!("line {}: '{}' outside a for loop", line, kw));
                }
                self.block_end()?;
                Ok(if kw == "break" {
                    Node::Break
                } else {
                    Node::Continue
                })
            }
            "call" | "filter" | "include" | "import" | "from" | "extends" | "block" | "with"
            | "autoescape" | "do" | "trans" => Err(unsupported(line, &format!("`{{% {} %}}`", kw))),
            _ => Err(format!("line {}: unknown tag `{{% {} %}}`", line, kw)),
        }
    }

    fn if_stmt(&mut self) -> Result<Node, String> {
        let mut branches = Vec::new();
        let mut cond = self.lexpr_tuple()?;
        loop {
            self.block_end()?;
            let (body, end) = self.nodes(&["elif", "else", "endif"])?;
            branches.push((cond, body));
            match end.as_deref() {
                Some("elif") => cond = self.lexpr_tuple()?,
                Some("else") => {
                    self.block_end()?;
                    let (else_body, _) = self.nodes(&["endif"])?;
                    self.block_end()?;
                    return Ok(Node::If(branches, else_body));
                }
                _ => {
                    self.block_end()?;
                    return Ok(Node::If(branches, Vec::new()));
                }
            }
        }
    }

    fn target(&mut self) -> Result<Target, String> {
        let first = self.ident()?;
        if self.eat_op(".") {
            let attr = self.ident()?;
            return Ok(Target::Attr(first, attr));
        }
        if !self.is_op(",") {
            return Ok(Target::Name(first));
        }
        let mut names = vec![first];
        while self.eat_op(",") {
            if !matches!(self.peek(), Some(Tok::Name(n)) if n != "in") {
                break;
            }
            names.push(self.ident()?);
        }
        Ok(Target::Tuple(names))
    }

    fn for_stmt(&mut self, line: usize) -> Result<Node, String> {
        let parenthesized = self.eat_op("(");
        let target = self.target()?;
        if parenthesized {
            self.expect_op(")")?;
        }
        if matches!(target, Target::Attr(..)) {
            return self.err("a for loop cannot assign to an attribute");
        }
        if !self.eat_name("in") {
            return self.err(format!("expected 'in', found {}", self.describe()));
        }
        // The iterable stops before `if` (the loop filter), so no bare ternary here.
        let iter_line = self.line();
        let iter = self.tuple_of(|p| p.or_expr())?;
        let iter = LExpr {
            expr: iter,
            line: iter_line,
        };
        let filter = if self.eat_name("if") {
            Some(self.lexpr()?)
        } else {
            None
        };
        if self.is_name("recursive") {
            return Err(unsupported(line, "a recursive for loop"));
        }
        self.block_end()?;
        self.loop_depth += 1;
        let parsed = self.nodes(&["else", "endfor"]);
        self.loop_depth -= 1;
        let (body, end) = parsed?;
        let else_body = if end.as_deref() == Some("else") {
            self.block_end()?;
            self.nodes(&["endfor"])?.0
        } else {
            Vec::new()
        };
        self.block_end()?;
        Ok(Node::For {
            target,
            iter,
            filter,
            body,
            else_body,
            line,
        })
    }

    fn set_stmt(&mut self, line: usize) -> Result<Node, String> {
        let target = self.target()?;
        if self.eat_op("=") {
            let value = self.lexpr_tuple()?;
            self.block_end()?;
            return Ok(Node::Set(target, value));
        }
        // `{% set name %}...{% endset %}`, optionally `{% set name | filter %}`.
        let Target::Name(name) = target else {
            return self.err("expected '=' in set");
        };
        let mut filters = Vec::new();
        while self.eat_op("|") {
            let (fname, args) = self.filter_call()?;
            filters.push((fname, args));
        }
        self.block_end()?;
        let (body, _) = self.nodes(&["endset"])?;
        self.block_end()?;
        Ok(Node::SetBlock(name, body, filters, line))
    }

    fn macro_stmt(&mut self) -> Result<Node, String> {
        let name = self.ident()?;
        self.expect_op("(")?;
        let mut params = Vec::new();
        while !self.eat_op(")") {
            if !params.is_empty() {
                self.expect_op(",")?;
                if self.eat_op(")") {
                    break;
                }
            }
            let p = self.ident()?;
            let default = if self.eat_op("=") {
                Some(self.expr()?)
            } else {
                None
            };
            params.push((p, default));
        }
        self.block_end()?;
        // A macro is a function of its own: a loop around its definition does not count.
        let depth = std::mem::take(&mut self.loop_depth);
        let parsed = self.nodes(&["endmacro"]);
        self.loop_depth = depth;
        let (body, _) = parsed?;
        // `{% endmacro name %}` is allowed.
        if matches!(self.peek(), Some(Tok::Name(_))) {
            self.pos += 1;
        }
        self.block_end()?;
        Ok(Node::Macro(std::sync::Arc::new(MacroDef {
            name,
            params,
            body,
        })))
    }

    fn lexpr(&mut self) -> Result<LExpr, String> {
        let line = self.line();
        Ok(LExpr {
            expr: self.expr()?,
            line,
        })
    }

    /// An expression that may be a bare tuple (`a, b`), as in `{{ }}` or `set x = a, b`.
    fn lexpr_tuple(&mut self) -> Result<LExpr, String> {
        let line = self.line();
        Ok(LExpr {
            expr: self.tuple_of(|p| p.expr())?,
            line,
        })
    }

    fn tuple_of(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<Expr, String>,
    ) -> Result<Expr, String> {
        let first = item(self)?;
        if !self.is_op(",") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat_op(",") {
            if matches!(self.peek(), Some(Tok::BlockEnd | Tok::VarEnd) | None) || self.is_name("if")
            {
                break;
            }
            items.push(item(self)?);
        }
        Ok(Expr::Tuple(items))
    }

    /// A full expression: the conditional (ternary) level.
    pub fn expr(&mut self) -> Result<Expr, String> {
        // Operator chains below bump the nesting too (a chain is as deep a tree as nested
        // parentheses); all of it is undone here.
        let base = self.nesting;
        self.enter()?;
        let result = self.expr_inner();
        self.nesting = base;
        result
    }

    /// One more level of tree under construction (an operator chain link).
    fn bump(&mut self) -> Result<(), String> {
        self.enter()
    }

    fn expr_inner(&mut self) -> Result<Expr, String> {
        let mut e = self.or_expr()?;
        while self.eat_name("if") {
            let cond = self.or_expr()?;
            let otherwise = if self.eat_name("else") {
                Some(Box::new(self.expr()?))
            } else {
                None
            };
            e = Expr::Cond(Box::new(e), Box::new(cond), otherwise);
            self.bump()?;
        }
        Ok(e)
    }

    fn or_expr(&mut self) -> Result<Expr, String> {
        let mut e = self.and_expr()?;
        while self.eat_name("or") {
            e = Expr::Or(Box::new(e), Box::new(self.and_expr()?));
            self.bump()?;
        }
        Ok(e)
    }

    fn and_expr(&mut self) -> Result<Expr, String> {
        let mut e = self.not_expr()?;
        while self.eat_name("and") {
            e = Expr::And(Box::new(e), Box::new(self.not_expr()?));
            self.bump()?;
        }
        Ok(e)
    }

    fn not_expr(&mut self) -> Result<Expr, String> {
        if self.eat_name("not") {
            self.enter()?;
            let inner = self.not_expr();
            self.nesting -= 1;
            return Ok(Expr::Not(Box::new(inner?)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, String> {
        let first = self.math1()?;
        let mut ops = Vec::new();
        loop {
            let op: &'static str = match self.peek() {
                Some(Tok::Op(o)) if matches!(*o, "==" | "!=" | "<" | ">" | "<=" | ">=") => o,
                Some(Tok::Name(n)) if n == "in" => "in",
                Some(Tok::Name(n))
                    if n == "not" && matches!(self.peek_at(1), Some(Tok::Name(m)) if m == "in") =>
                {
                    self.pos += 1;
                    "not in"
                }
                _ => break,
            };
            self.pos += 1;
            ops.push((op, self.math1()?));
        }
        Ok(if ops.is_empty() {
            first
        } else {
            Expr::Compare(Box::new(first), ops)
        })
    }

    fn math1(&mut self) -> Result<Expr, String> {
        let mut e = self.concat()?;
        loop {
            let op = if self.eat_op("+") {
                "+"
            } else if self.eat_op("-") {
                "-"
            } else {
                return Ok(e);
            };
            e = Expr::Binary(op, Box::new(e), Box::new(self.concat()?));
            self.bump()?;
        }
    }

    fn concat(&mut self) -> Result<Expr, String> {
        let mut e = self.math2()?;
        while self.eat_op("~") {
            e = Expr::Binary("~", Box::new(e), Box::new(self.math2()?));
            self.bump()?;
        }
        Ok(e)
    }

    fn math2(&mut self) -> Result<Expr, String> {
        let mut e = self.pow()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) if matches!(*o, "*" | "/" | "//" | "%") => *o,
                _ => return Ok(e),
            };
            self.pos += 1;
            e = Expr::Binary(op, Box::new(e), Box::new(self.pow()?));
            self.bump()?;
        }
    }

    fn pow(&mut self) -> Result<Expr, String> {
        let mut e = self.unary(true)?;
        while self.eat_op("**") {
            e = Expr::Binary("**", Box::new(e), Box::new(self.unary(true)?));
            self.bump()?;
        }
        Ok(e)
    }

    fn unary(&mut self, with_filter: bool) -> Result<Expr, String> {
        self.enter()?;
        let result = self.unary_inner(with_filter);
        self.nesting -= 1;
        result
    }

    fn unary_inner(&mut self, with_filter: bool) -> Result<Expr, String> {
        let e = if self.eat_op("-") {
            Expr::Unary("-", Box::new(self.unary(false)?))
        } else if self.eat_op("+") {
            Expr::Unary("+", Box::new(self.unary(false)?))
        } else {
            self.primary()?
        };
        let e = self.postfix(e)?;
        if with_filter {
            self.filter_expr(e)
        } else {
            Ok(e)
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let line = self.line();
        match self.next() {
            Some(Tok::Name(n)) => Ok(match n.as_str() {
                "true" | "True" => Expr::Const(Lit::Bool(true)),
                "false" | "False" => Expr::Const(Lit::Bool(false)),
                "none" | "None" => Expr::Const(Lit::None),
                _ => Expr::Name(n),
            }),
            Some(Tok::Str(s)) => {
                // Adjacent string literals concatenate, as in Python.
                let mut s = s;
                while let Some(Tok::Str(more)) = self.peek() {
                    s.push_str(more);
                    self.pos += 1;
                }
                Ok(Expr::Const(Lit::Str(s)))
            }
            Some(Tok::Int(i)) => Ok(Expr::Const(Lit::Int(i))),
            Some(Tok::Float(f)) => Ok(Expr::Const(Lit::Float(f))),
            Some(Tok::Op("(")) => {
                if self.eat_op(")") {
                    return Ok(Expr::Tuple(Vec::new()));
                }
                let first = self.expr()?;
                if self.eat_op(")") {
                    return Ok(first);
                }
                let mut items = vec![first];
                while self.eat_op(",") {
                    if self.is_op(")") {
                        break;
                    }
                    items.push(self.expr()?);
                }
                self.expect_op(")")?;
                Ok(Expr::Tuple(items))
            }
            Some(Tok::Op("[")) => {
                let mut items = Vec::new();
                while !self.eat_op("]") {
                    if !items.is_empty() {
                        self.expect_op(",")?;
                        if self.eat_op("]") {
                            break;
                        }
                    }
                    items.push(self.expr()?);
                }
                Ok(Expr::List(items))
            }
            Some(Tok::Op("{")) => {
                let mut items = Vec::new();
                while !self.eat_op("}") {
                    if !items.is_empty() {
                        self.expect_op(",")?;
                        if self.eat_op("}") {
                            break;
                        }
                    }
                    let k = self.expr()?;
                    self.expect_op(":")?;
                    items.push((k, self.expr()?));
                }
                Ok(Expr::Dict(items))
            }
            _ => {
                self.pos -= 1;
                Err(format!(
                    "line {}: unexpected {} in an expression",
                    line,
                    self.describe()
                ))
            }
        }
    }

    fn postfix(&mut self, mut e: Expr) -> Result<Expr, String> {
        loop {
            if self.eat_op(".") {
                match self.next() {
                    Some(Tok::Name(n)) => {
                        e = Expr::Attr(Box::new(e), n);
                        self.bump()?;
                    }
                    Some(Tok::Int(i)) => {
                        e = Expr::Item(Box::new(e), Box::new(Expr::Const(Lit::Int(i))));
                        self.bump()?;
                    }
                    _ => {
                        self.pos -= 1;
                        return self.err(format!(
                            "expected an attribute name, found {}",
                            self.describe()
                        ));
                    }
                }
            } else if self.eat_op("[") {
                e = self.subscript(e)?;
                self.bump()?;
            } else if self.is_op("(") {
                let args = self.call_args()?;
                e = Expr::Call(Box::new(e), args);
                self.bump()?;
            } else {
                return Ok(e);
            }
        }
    }

    fn subscript(&mut self, e: Expr) -> Result<Expr, String> {
        let mut parts: Vec<Option<Box<Expr>>> = vec![None];
        let mut is_slice = false;
        loop {
            if self.eat_op("]") {
                break;
            }
            if self.eat_op(":") {
                is_slice = true;
                parts.push(None);
                if parts.len() > 3 {
                    return self.err("too many ':' in a slice");
                }
                continue;
            }
            let last = parts.len() - 1;
            if parts[last].is_some() {
                return self.err(format!("expected ']' or ':', found {}", self.describe()));
            }
            parts[last] = Some(Box::new(self.expr()?));
        }
        if !is_slice {
            return match parts.pop().flatten() {
                Some(index) => Ok(Expr::Item(Box::new(e), index)),
                None => self.err("empty subscript"),
            };
        }
        parts.resize(3, None);
        let step = parts.pop().flatten();
        let stop = parts.pop().flatten();
        let start = parts.pop().flatten();
        Ok(Expr::Slice(Box::new(e), start, stop, step))
    }

    fn call_args(&mut self) -> Result<Args, String> {
        self.expect_op("(")?;
        let mut args = Args::default();
        while !self.eat_op(")") {
            if !(args.pos.is_empty() && args.kw.is_empty()) {
                self.expect_op(",")?;
                if self.eat_op(")") {
                    break;
                }
            }
            if self.is_op("*") || self.is_op("**") {
                return Err(unsupported(self.line(), "`*args`/`**kwargs` in a call"));
            }
            let is_kw = matches!(self.peek(), Some(Tok::Name(_)))
                && matches!(self.peek_at(1), Some(Tok::Op("=")));
            if is_kw {
                let name = self.ident()?;
                self.pos += 1;
                args.kw.push((name, self.expr()?));
            } else {
                if !args.kw.is_empty() {
                    return self.err("a positional argument after keyword arguments");
                }
                args.pos.push(self.expr()?);
            }
        }
        Ok(args)
    }

    /// A filter's (possibly dotted) name and arguments; the name is checked afterwards
    /// (`check_nodes`), where it is known whether it sits in a soft place.
    fn filter_call(&mut self) -> Result<(String, Args), String> {
        let mut name = self.ident()?;
        while self.eat_op(".") {
            name.push('.');
            name.push_str(&self.ident()?);
        }
        let args = if self.is_op("(") {
            self.call_args()?
        } else {
            Args::default()
        };
        Ok((name, args))
    }

    fn filter_expr(&mut self, mut e: Expr) -> Result<Expr, String> {
        loop {
            if self.eat_op("|") {
                let (name, args) = self.filter_call()?;
                e = Expr::Filter(Box::new(e), name, args);
                self.bump()?;
            } else if self.eat_name("is") {
                let negated = self.eat_name("not");
                let name = match self.next() {
                    Some(Tok::Name(n)) => n,
                    // `is none`/`is true` lex as names; these are the literal-named tests.
                    _ => {
                        self.pos -= 1;
                        return self
                            .err(format!("expected a test name, found {}", self.describe()));
                    }
                };
                let args = if self.is_op("(") {
                    self.call_args()?
                } else if matches!(
                    self.peek(),
                    Some(
                        Tok::Name(_)
                            | Tok::Str(_)
                            | Tok::Int(_)
                            | Tok::Float(_)
                            | Tok::Op("(" | "[" | "{")
                    )
                ) && !(self.is_name("else") || self.is_name("or") || self.is_name("and"))
                {
                    if self.is_name("is") {
                        return self.err("you cannot chain multiple tests with 'is'");
                    }
                    let arg = self.primary()?;
                    let arg = self.postfix(arg)?;
                    Args {
                        pos: vec![arg],
                        kw: Vec::new(),
                    }
                } else {
                    Args::default()
                };
                let test = Expr::Test(Box::new(e), name, args);
                e = if negated {
                    Expr::Not(Box::new(test))
                } else {
                    test
                };
                self.bump()?;
            } else if self.is_op("(") {
                let args = self.call_args()?;
                e = Expr::Call(Box::new(e), args);
                self.bump()?;
            } else {
                return Ok(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lexer::tokenize;

    fn parse_src(src: &str) -> Result<Vec<Node>, String> {
        parse(tokenize(src)?)
    }

    #[test]
    fn statements_nest() {
        let nodes = parse_src("{% for m in messages if m.role != 'system' %}{% if loop.first %}a{% elif x %}b{% else %}c{% endif %}{% else %}none{% endfor %}").unwrap();
        match &nodes[0] {
            Node::For {
                filter,
                body,
                else_body,
                ..
            } => {
                assert!(filter.is_some());
                assert!(
                    matches!(&body[0], Node::If(branches, els) if branches.len() == 2 && els.len() == 1)
                );
                assert_eq!(else_body.len(), 1);
            }
            other => panic!("{:?}", other),
        }
    }

    #[test]
    fn precedence_follows_jinja() {
        // `is` binds tighter than `!=`; `~` looser than `*`; filters bind to the operand.
        let nodes = parse_src("{{ a != b is even }}{{ 'x' ~ 2 * 3 }}{{ -x|abs }}").unwrap();
        match &nodes[0] {
            Node::Output(e) => assert!(
                matches!(&e.expr, Expr::Compare(_, ops) if matches!(ops[0].1, Expr::Test(..)))
            ),
            other => panic!("{:?}", other),
        }
        match &nodes[1] {
            Node::Output(e) => assert!(
                matches!(&e.expr, Expr::Binary("~", _, r) if matches!(**r, Expr::Binary("*", ..)))
            ),
            other => panic!("{:?}", other),
        }
        match &nodes[2] {
            Node::Output(e) => assert!(
                matches!(&e.expr, Expr::Filter(inner, name, _) if name == "abs" && matches!(**inner, Expr::Unary("-", _)))
            ),
            other => panic!("{:?}", other),
        }
    }

    #[test]
    fn slices_parse() {
        let nodes = parse_src("{{ x[::-1] }}{{ x[1:] }}{{ x[:2] }}").unwrap();
        for n in &nodes {
            assert!(matches!(
                n,
                Node::Output(LExpr {
                    expr: Expr::Slice(..),
                    ..
                })
            ));
        }
    }

    #[test]
    fn unsupported_constructs_name_line_and_construct() {
        let e = parse_src("a\n{% include 'x' %}").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("include"), "{}", e);
        let e = parse_src("{{ x | wibble }}").unwrap_err();
        assert!(e.contains("'wibble'"), "{}", e);
        let e = parse_src("{% if x %}").unwrap_err();
        assert!(e.contains("endif"), "{}", e);
        assert!(parse_src("{% for %}").is_err());
    }
}
