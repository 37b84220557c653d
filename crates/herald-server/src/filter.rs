//! Subscription filters: a CEL expression over a message's `name` and `headers`, compiled once
//! when a client subscribes and evaluated on the server for every message of the channel.
//!
//! The expression sees exactly two variables: `name` (a string, `""` when the message has
//! none) and `headers` (a map of string to string). Nothing else of the message, no clock and
//! no environment is reachable, so a filter's answer depends on the message alone and a
//! resumed subscription filters exactly as the first one did.
//!
//! # Invariants
//! - [`Filter::compile`] rejects, with [`ErrorCode::InvalidFilter`]: an empty or oversized
//!   expression, a syntax error, a reference to any variable but `name` and `headers`, a
//!   nested comprehension, an expression nested or chained beyond the limits below, and an
//!   expression that is not boolean whenever that can be told before the first message (a
//!   literal, a bare variable or field, or a trial evaluation on a message with no name and
//!   no headers that yields a non-boolean or calls an unknown function).
//! - [`Filter::matches`] never fails: an evaluation error (a missing header key, a type
//!   mismatch) or a non-boolean result means "does not match". A filter is a predicate over
//!   what a message carries; a message that lacks what the filter asks about is not wanted.
//! - No filter can overflow a stack. The `cel` parser and evaluator recurse, and a stack
//!   overflow aborts the whole process, so: the source is checked for bracket nesting and
//!   operator chains before it reaches the parser, the parser runs on a thread of its own
//!   with a stack sized for what that check lets through (unoptimised builds use tens of KiB
//!   per level), and the compiled tree is at most [`EXPRESSION_DEPTH_MAX`] deep, which bounds
//!   the evaluation in [`Filter::matches`] on the caller's stack.
//! - Evaluation cost is bounded by the expression size times the message's header count:
//!   comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) may not nest, so no
//!   filter can loop over a loop.
//! - The `regex` feature of `cel` is off: its `matches()` compiles the pattern again on every
//!   call, which is too dear to run once per message per subscriber. `matches()` is therefore
//!   an unknown function here (rejected when the trial evaluation reaches it).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::types::{CelMap, CelMapKey, CelString};
use cel::common::value::Val;
use cel::{Context, Env, ExecutionError, Program, Value};
use herald_core::{ErrorCode, Headers, InvalidInput};

/// The variable holding the message name.
const NAME: &str = "name";
/// The variable holding the message headers.
const HEADERS: &str = "headers";
/// How many comprehensions may enclose one another. One loop over the headers or over a list
/// literal is linear in the message or in the expression; a loop inside a loop is not.
const COMPREHENSION_DEPTH_MAX: usize = 1;
/// How deep brackets (`(`, `[`, `{`) may nest in the source.
const NESTING_MAX: usize = 16;
/// How many binary arithmetic or comparison operators (`+ - * / % < <= > >= == != in`) may
/// follow one another at one nesting level without `&&`, `||`, `?:` or `,` between them. The
/// parser builds a left-deep tree for such a chain and walks it recursively.
const CHAIN_MAX: usize = 32;
/// How deep the compiled expression tree may be. Evaluation recurses once per level on the
/// caller's stack (measured: about 40 KiB per level in an unoptimised build, 2 KiB optimised,
/// so this stays well inside a 2 MiB tokio worker stack). Real filters are shallow: a
/// balanced `&&`/`||` of a hundred comparisons is 10 levels deep.
pub const EXPRESSION_DEPTH_MAX: usize = 12;
/// The stack of the compiling thread. The deepest source [`check_shape`] lets through
/// ([`NESTING_MAX`] levels, each a [`CHAIN_MAX`] chain) compiles in 4 MiB in an unoptimised
/// build, where 16 nested brackets alone overflow a 2 MiB stack; this is eight times that.
/// Only the pages touched are ever backed by memory.
const COMPILE_STACK_BYTES: usize = 32 << 20;

/// The standard CEL library and macros, built once: building it registers every overload,
/// which is far dearer than compiling one expression.
static ENVIRONMENT: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled filter. Cheap to clone; shared by every task that delivers to the subscription.
#[derive(Clone)]
pub struct Filter {
    compiled: Arc<Compiled>,
}

struct Compiled {
    source: String,
    program: Program,
    /// Whether the expression mentions `name` / `headers`: a variable it never reads is not
    /// built for each message.
    reads_name: bool,
    reads_headers: bool,
}

impl Filter {
    /// Compiles `expression`. Fails with [`ErrorCode::InvalidFilter`] on an empty expression,
    /// one over `max_bytes`, a syntax error, a reference to a variable other than `name` and
    /// `headers`, a nested comprehension, nesting beyond the limits, or a non-boolean result
    /// when that can be told.
    ///
    /// Blocks for the compilation (tens to hundreds of microseconds), which runs on a
    /// short-lived thread of its own (see the module invariants); a failure to start that
    /// thread is [`ErrorCode::Unavailable`].
    pub fn compile(expression: &str, max_bytes: usize) -> Result<Filter, InvalidInput> {
        if expression.trim().is_empty() {
            return Err(invalid("a filter must be a non-empty CEL expression"));
        }
        if expression.len() > max_bytes {
            return Err(invalid(format!(
                "a filter is at most {max_bytes} bytes; this one is {}",
                expression.len()
            )));
        }
        check_shape(expression)?;
        std::thread::scope(|scope| {
            let compiling = std::thread::Builder::new()
                .name("herald-filter".to_owned())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, || Filter::compile_checked(expression))
                .map_err(|error| {
                    InvalidInput::new(
                        ErrorCode::Unavailable,
                        format!("cannot start compiling the filter: {error}"),
                    )
                })?;
            compiling.join().unwrap_or_else(|_panic| {
                // A parser bug met on client input: refuse the filter, keep the server.
                tracing::error!(filter = expression, "the CEL compiler panicked");
                Err(invalid("the filter could not be compiled"))
            })
        })
    }

    /// [`Filter::compile`] once the source is known to be small and shallow enough to parse.
    fn compile_checked(expression: &str) -> Result<Filter, InvalidInput> {
        let program = ENVIRONMENT
            .compile(expression)
            .map_err(|errors| invalid(format!("the filter does not parse: {errors}")))?;

        let mut check = Check::default();
        check.walk(program.expression(), 0, 0)?;
        if let Some(kind) = static_non_boolean(program.expression()) {
            return Err(invalid(format!(
                "a filter must evaluate to a bool; this one is {kind}"
            )));
        }

        let filter = Filter {
            compiled: Arc::new(Compiled {
                source: expression.to_owned(),
                program,
                reads_name: check.reads_name,
                reads_headers: check.reads_headers,
            }),
        };
        filter.trial()?;
        Ok(filter)
    }

    /// Whether a message with this `name` (`None`: no name, seen as `""`) and these headers
    /// passes the filter. An evaluation error or a non-boolean result is `false`.
    pub fn matches(&self, name: Option<&str>, headers: &Headers) -> bool {
        matches!(self.evaluate(name, headers), Ok(Value::Bool(true)))
    }

    /// The expression as the subscriber wrote it.
    pub fn source(&self) -> &str {
        &self.compiled.source
    }

    fn evaluate(&self, name: Option<&str>, headers: &Headers) -> Result<Value, ExecutionError> {
        let compiled = &*self.compiled;
        let mut context = Context::with_env(Arc::clone(&ENVIRONMENT));
        if compiled.reads_name {
            context.add_variable_as_val(NAME, Box::new(CelString::from(name.unwrap_or(""))));
        }
        if compiled.reads_headers {
            // Keys and values borrow from the message: no copy of header text per evaluation.
            let map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = headers
                .iter()
                .map(|(key, value)| {
                    let value: Box<dyn Val + '_> = Box::new(CelString::from(value.as_str()));
                    (CelMapKey::from(key.as_str()), value)
                })
                .collect();
            context.add_variable_as_val(HEADERS, Box::new(CelMap::from(map)));
        }
        compiled.program.execute(&context)
    }

    /// Evaluates once on a message with no name and no headers, to reject what can only be a
    /// mistake: a non-boolean result, or a function that does not exist. Other errors (a
    /// missing header key) are what filters on headers normally meet, and are allowed.
    fn trial(&self) -> Result<(), InvalidInput> {
        match self.evaluate(None, &Headers::new()) {
            Ok(Value::Bool(_)) => Ok(()),
            Ok(other) => Err(invalid(format!(
                "a filter must evaluate to a bool; this one gave {:?}",
                other.type_of()
            ))),
            Err(ExecutionError::UndeclaredReference(what)) => Err(invalid(format!(
                "the filter uses {what:?}, which is not a known function; \
                 the variables are `name` and `headers`"
            ))),
            Err(_) => Ok(()),
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Filter")
            .field(&self.compiled.source)
            .finish()
    }
}

fn invalid(message: impl Into<String>) -> InvalidInput {
    InvalidInput::new(ErrorCode::InvalidFilter, message)
}

/// Checks bracket nesting and operator chains on the source text, before the parser sees it.
///
/// String literals and comments are skipped the way CEL's lexer reads them. Where the two
/// could disagree (an unterminated string, an invalid escape, a string glued to an identifier
/// other than a `r`/`b` prefix) the expression is refused outright: each of those is a syntax
/// error anyway, and refusing keeps this check from ever reading code as a string.
fn check_shape(source: &str) -> Result<(), InvalidInput> {
    let bytes = source.as_bytes();
    // One operator count per open bracket level, the outermost first.
    let mut chains: Vec<usize> = vec![0];
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        let next = bytes.get(index + 1).copied();
        let mut width = 1;
        let mut operator = false;
        match byte {
            b'"' | b'\'' => {
                index = skip_string(source, index)?;
                continue;
            }
            b'/' if next == Some(b'/') => {
                // A comment runs to the end of the line.
                index = bytes[index..]
                    .iter()
                    .position(|&byte| byte == b'\n')
                    .map_or(bytes.len(), |offset| index + offset + 1);
                continue;
            }
            b'(' | b'[' | b'{' => {
                chains.push(0);
                if chains.len() - 1 > NESTING_MAX {
                    return Err(invalid(format!(
                        "a filter may nest brackets at most {NESTING_MAX} deep"
                    )));
                }
            }
            // An unbalanced close is the parser's to report: the outermost level stays.
            b')' | b']' | b'}' if chains.len() > 1 => {
                chains.pop();
            }
            b'&' | b'|' | b'?' | b':' | b',' => {
                *chains.last_mut().expect("the outermost level stays") = 0;
            }
            b'=' | b'!' | b'<' | b'>' if next == Some(b'=') => {
                width = 2;
                operator = true;
            }
            // A lone `!` is a prefix the parser reads in a loop, not a chain link.
            b'+' | b'-' | b'*' | b'/' | b'%' | b'<' | b'>' | b'=' => operator = true,
            _ if is_identifier_byte(byte) => {
                width = bytes[index..]
                    .iter()
                    .position(|&byte| !is_identifier_byte(byte))
                    .unwrap_or(bytes.len() - index);
                operator = &bytes[index..index + width] == b"in";
            }
            _ => {}
        }
        if operator {
            let chain = chains.last_mut().expect("the outermost level stays");
            *chain += 1;
            if *chain > CHAIN_MAX {
                return Err(invalid(format!(
                    "a filter may chain at most {CHAIN_MAX} arithmetic or comparison \
                     operators without && or || between them"
                )));
            }
        }
        index += width;
    }
    Ok(())
}

fn is_identifier_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Skips the string or bytes literal whose opening quote is at `start`; returns the index
/// right after its closing quote.
fn skip_string(source: &str, start: usize) -> Result<usize, InvalidInput> {
    let bytes = source.as_bytes();
    let prefix_start = bytes[..start]
        .iter()
        .rposition(|&byte| !is_identifier_byte(byte))
        .map_or(0, |position| position + 1);
    let raw = match &source[prefix_start..start] {
        "" | "b" | "B" => false,
        "r" | "R" | "br" | "bR" | "Br" | "BR" => true,
        _ => {
            return Err(invalid(
                "a string literal cannot follow an identifier or a number directly",
            ));
        }
    };
    let quote = bytes[start];
    let triple = bytes[start..].starts_with(&[quote, quote, quote]);
    let unterminated = || invalid("the filter has an unterminated string literal");
    let mut index = start + if triple { 3 } else { 1 };
    loop {
        let Some(&byte) = bytes.get(index) else {
            return Err(unterminated());
        };
        if triple && bytes[index..].starts_with(&[quote, quote, quote]) {
            return Ok(index + 3);
        }
        if !triple && byte == quote {
            return Ok(index + 1);
        }
        if !triple && (byte == b'\n' || byte == b'\r') {
            return Err(unterminated());
        }
        index += if byte == b'\\' && !raw {
            escape_width(&bytes[index..]).ok_or_else(|| {
                invalid("the filter has an invalid escape sequence in a string literal")
            })?
        } else {
            1
        };
    }
}

/// The length of the escape sequence at the start of `text` (which starts with `\`), as CEL's
/// lexer accepts them; `None` for an invalid one.
fn escape_width(text: &[u8]) -> Option<usize> {
    let hex_digits = |count: usize| {
        let digits = text.get(2..2 + count)?;
        digits
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(2 + count)
    };
    match *text.get(1)? {
        b'a' | b'b' | b'f' | b'n' | b'r' | b't' | b'v' | b'"' | b'\'' | b'\\' | b'?' | b'`' => {
            Some(2)
        }
        b'x' | b'X' => hex_digits(2),
        b'u' => hex_digits(4),
        b'U' => hex_digits(8),
        b'0'..=b'3' => {
            let digits = text.get(2..4)?;
            digits
                .iter()
                .all(|digit| (b'0'..=b'7').contains(digit))
                .then_some(4)
        }
        _ => None,
    }
}

/// The kind of value the expression's root certainly yields, when that is not a bool.
fn static_non_boolean(root: &IdedExpr) -> Option<&'static str> {
    match &root.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => None,
        Expr::Literal(_) => Some("a literal that is not a bool"),
        // `name`, `headers` and `headers.x` are a string, a map and a string.
        Expr::Ident(_) => Some("a variable, not a condition"),
        Expr::Select(select) if !select.test => Some("a field, not a condition"),
        Expr::List(_) => Some("a list"),
        Expr::Map(_) => Some("a map"),
        Expr::Struct(_) => Some("a message literal"),
        _ => None,
    }
}

/// One walk over the compiled tree: the variables it reads, its depth and the nesting of its
/// loops.
#[derive(Default)]
struct Check {
    /// Loop variables of the enclosing comprehensions (`x` in `headers.exists(x, ...)`, and
    /// the accumulator the macros introduce).
    bound: Vec<String>,
    reads_name: bool,
    reads_headers: bool,
}

impl Check {
    fn walk(
        &mut self,
        node: &IdedExpr,
        depth: usize,
        loop_depth: usize,
    ) -> Result<(), InvalidInput> {
        if depth >= EXPRESSION_DEPTH_MAX {
            return Err(invalid(format!(
                "the filter nests more than {EXPRESSION_DEPTH_MAX} levels deep"
            )));
        }
        let below = depth + 1;
        match &node.expr {
            Expr::Unspecified | Expr::Literal(_) => Ok(()),
            Expr::Ident(ident) => self.identifier(ident),
            Expr::Select(select) => self.walk(&select.operand, below, loop_depth),
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.walk(target, below, loop_depth)?;
                }
                call.args
                    .iter()
                    .try_for_each(|arg| self.walk(arg, below, loop_depth))
            }
            Expr::List(list) => list
                .elements
                .iter()
                .try_for_each(|element| self.walk(element, below, loop_depth)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(pair) => {
                    self.walk(&pair.key, below, loop_depth)?;
                    self.walk(&pair.value, below, loop_depth)
                }
                EntryExpr::StructField(field) => self.walk(&field.value, below, loop_depth),
            }),
            Expr::Struct(message) => Err(invalid(format!(
                "a filter cannot build a {:?} message; it sees only `name` and `headers`",
                message.type_name
            ))),
            Expr::Comprehension(comprehension) => {
                // The range and the initial value are evaluated once, outside the loop.
                self.walk(&comprehension.iter_range, below, loop_depth)?;
                self.walk(&comprehension.accu_init, below, loop_depth)?;
                let inner_loop_depth = loop_depth + 1;
                if inner_loop_depth > COMPREHENSION_DEPTH_MAX {
                    return Err(invalid(
                        "a filter may not nest loops (all, exists, exists_one, map, filter \
                         inside another one)",
                    ));
                }
                let bound_before = self.bound.len();
                self.bound.push(comprehension.iter_var.clone());
                if let Some(second) = &comprehension.iter_var2 {
                    self.bound.push(second.clone());
                }
                self.bound.push(comprehension.accu_var.clone());
                let body = self
                    .walk(&comprehension.loop_cond, below, inner_loop_depth)
                    .and_then(|()| self.walk(&comprehension.loop_step, below, inner_loop_depth));
                // The result sees the accumulator but runs once.
                let result =
                    body.and_then(|()| self.walk(&comprehension.result, below, loop_depth));
                self.bound.truncate(bound_before);
                result
            }
        }
    }

    fn identifier(&mut self, ident: &str) -> Result<(), InvalidInput> {
        // A leading dot names the root scope: `.name` is `name`, never a loop variable.
        let absolute = ident.strip_prefix('.');
        let plain = absolute.unwrap_or(ident);
        if absolute.is_none() && self.bound.iter().any(|bound| bound == plain) {
            return Ok(());
        }
        match plain {
            NAME => self.reads_name = true,
            HEADERS => self.reads_headers = true,
            // Type names (`type(name) == string`) resolve to types, not variables.
            _ if ENVIRONMENT.types().find_type(plain).is_some() => {}
            _ => {
                return Err(invalid(format!(
                    "unknown variable {plain:?}: a filter sees only `name` and `headers`"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BYTES: usize = 1024;

    fn filter(expression: &str) -> Filter {
        Filter::compile(expression, MAX_BYTES)
            .unwrap_or_else(|error| panic!("{expression:?} should compile: {error}"))
    }

    fn rejected(expression: &str) -> InvalidInput {
        match Filter::compile(expression, MAX_BYTES) {
            Ok(_) => panic!("{expression:?} should be rejected"),
            Err(error) => {
                assert_eq!(error.code, ErrorCode::InvalidFilter, "{error}");
                error
            }
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn filters_on_the_name() {
        let order = filter(r#"name == "order""#);
        assert!(order.matches(Some("order"), &Headers::new()));
        assert!(!order.matches(Some("orders"), &Headers::new()));
        assert!(!order.matches(None, &Headers::new()));

        let temperature = filter(r#"name.startsWith("temp")"#);
        assert!(temperature.matches(Some("temperature"), &Headers::new()));
        assert!(!temperature.matches(Some("humidity"), &Headers::new()));
        // No name is the empty string, not an error.
        let unnamed = filter(r#"name == """#);
        assert!(unnamed.matches(None, &Headers::new()));
        assert_eq!(temperature.source(), r#"name.startsWith("temp")"#);
    }

    #[test]
    fn filters_on_headers() {
        let region = filter(r#"headers.region in ["eu", "us"]"#);
        assert!(region.matches(None, &headers(&[("region", "eu")])));
        assert!(region.matches(None, &headers(&[("region", "us"), ("x", "y")])));
        assert!(!region.matches(None, &headers(&[("region", "ap")])));

        let kind = filter(r#"has(headers.kind) && headers.kind == "x""#);
        assert!(kind.matches(None, &headers(&[("kind", "x")])));
        assert!(!kind.matches(None, &headers(&[("kind", "y")])));
        assert!(!kind.matches(None, &Headers::new()));

        let indexed = filter(r#"headers["content-type"] == "json" || name == "raw""#);
        assert!(indexed.matches(None, &headers(&[("content-type", "json")])));
        assert!(indexed.matches(Some("raw"), &Headers::new()));

        let any_key = filter(r#"headers.exists(key, key.startsWith("x-"))"#);
        assert!(any_key.matches(None, &headers(&[("x-trace", "1")])));
        assert!(!any_key.matches(None, &headers(&[("trace", "1")])));
    }

    #[test]
    fn a_missing_header_does_not_match() {
        let region = filter(r#"headers.region == "eu""#);
        assert!(!region.matches(Some("order"), &Headers::new()));
        // Negation does not turn the error into a match either.
        let not_region = filter(r#"headers.region != "eu""#);
        assert!(!not_region.matches(Some("order"), &Headers::new()));
        assert!(not_region.matches(Some("order"), &headers(&[("region", "us")])));
    }

    #[test]
    fn bad_expressions_are_invalid_filters() {
        rejected("");
        rejected("   ");
        rejected(r#"name == "#);
        rejected(r#"name == "unterminated"#);
        rejected("foo == 1");
        rejected("message.name == \"x\"");
        rejected(r#"name == "a" && data.size() > 1"#);
        // Loop variables do not leak out of their loop.
        rejected(r#"headers.exists(k, k == "a") && k == "a""#);
        rejected(r#"my.pkg.Type{field: 1} == name"#);
        let oversize = format!(r#"name == "{}""#, "x".repeat(MAX_BYTES));
        assert!(rejected(&oversize).message.contains("at most"));
    }

    #[test]
    fn non_boolean_filters_are_rejected() {
        rejected("name");
        rejected("headers");
        rejected("headers.kind");
        rejected("1");
        rejected(r#""yes""#);
        rejected("[true]");
        rejected("size(name)");
        rejected(r#"name + "x""#);
        // A function that does not exist (regex support is off).
        rejected(r#"name.matches("^a")"#);
        rejected(r#"nosuch(name)"#);
    }

    #[test]
    fn a_non_boolean_result_at_run_time_never_matches() {
        // Only known at run time: the header's value decides the branch's type.
        let odd = filter(r#"headers.kind == "x" ? true : headers.kind"#);
        assert!(odd.matches(None, &headers(&[("kind", "x")])));
        assert!(!odd.matches(None, &headers(&[("kind", "y")])));
    }

    #[test]
    fn loops_may_not_nest() {
        filter(r#"headers.all(k, k.size() < 10)"#);
        filter(r#"[1, 2].map(x, x).exists(y, y == 2) && name == """#);
        let error = rejected(r#"headers.exists(a, headers.exists(b, a == b))"#);
        assert!(error.message.contains("nest"), "{error}");
    }

    #[test]
    fn strings_and_comments_do_not_count_as_nesting() {
        let brackets = filter(r#"name == "((((((((((((((((((((((((((((((((((" || name == "]]]""#);
        assert!(brackets.matches(Some("]]]"), &Headers::new()));
        // A raw string ends at the first quote: its backslash escapes nothing.
        let raw = filter(r#"name == r"\" && headers.a == '[[[[[[[[[[[[[[[[[[[[[['"#);
        assert!(raw.matches(Some("\\"), &headers(&[("a", "[[[[[[[[[[[[[[[[[[[[[[")])));
        let escaped = filter(r#"name == "a\"(((((((((((((((((((((((((((((((((((((\u0041""#);
        assert!(escaped.matches(
            Some("a\"(((((((((((((((((((((((((((((((((((((A"),
            &Headers::new()
        ));
        let triple = filter(
            "name == \"\"\"(((((((((((((((((((((((((((\"\"\" // (((((((((((((((((((\n|| false",
        );
        assert!(triple.matches(Some("((((((((((((((((((((((((((("), &Headers::new()));
    }

    #[test]
    fn what_could_hide_nesting_from_the_check_is_refused() {
        // Each of these would make the check read code as a string; each is a syntax error.
        rejected(r#"name == "(((((((((((((((((((((((((((((((((((((((((((((((("#);
        rejected("name == \"a\n\" && (((((((((((((((((((((((((true)))))))))))))))))))))))))");
        rejected(r#"name == "\q" && name == "x""#);
        rejected(r#"name == x"a""#);
        rejected(r#"name == 1r"a""#);
    }

    /// A stack overflow aborts the whole server: the worst shapes the source check lets
    /// through must compile (or be refused) without one, in this unoptimised test build too.
    #[test]
    fn the_deepest_shapes_are_refused_without_overflowing() {
        let chain = " + 1".repeat(CHAIN_MAX - 1);
        let mut nested = "1".to_owned();
        for _ in 0..NESTING_MAX {
            // The nested group is the leftmost operand: the bottom of the left-deep chain.
            nested = format!("({nested}{chain})");
        }
        let worst = format!("{nested} == 1");
        let error = Filter::compile(&worst, 1 << 20).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidFilter);
        let lists = format!(
            "{}1{} == name",
            "[".repeat(NESTING_MAX),
            "]".repeat(NESTING_MAX)
        );
        assert_eq!(
            Filter::compile(&lists, 1 << 20).unwrap_err().code,
            ErrorCode::InvalidFilter
        );

        let too_deep = format!("{}true{}", "(".repeat(200), ")".repeat(200));
        assert!(rejected(&too_deep).message.contains("nest"));
        let too_long = format!("size({}) > 0", vec!["name"; 200].join(" + "));
        assert!(
            Filter::compile(&too_long, 1 << 20)
                .unwrap_err()
                .message
                .contains("chain")
        );
        let too_deep_tree = format!("has(headers{})", ".a".repeat(200));
        assert!(rejected(&too_deep_tree).message.contains("levels"));
        // Long `||` chains are balanced by the compiler, so they stay shallow.
        let clauses: Vec<String> = (0..100)
            .map(|index| format!("headers.h{index} == \"v\""))
            .collect();
        let wide = Filter::compile(&clauses.join(" || "), 1 << 20).unwrap();
        assert!(wide.matches(None, &headers(&[("h99", "v")])));
        assert!(!wide.matches(None, &headers(&[("h100", "v")])));
    }

    #[test]
    fn type_names_are_not_unknown_variables() {
        let typed = filter("type(name) == string");
        assert!(typed.matches(Some("a"), &Headers::new()));
    }

    #[test]
    fn filters_are_shareable_across_tasks() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Filter>();
        let shared = filter(r#"name == "a""#);
        let other = shared.clone();
        let handle = std::thread::spawn(move || other.matches(Some("a"), &Headers::new()));
        assert!(handle.join().unwrap());
        assert!(!shared.matches(Some("b"), &Headers::new()));
    }

    /// `cargo test -p herald-server --release filter::tests::matches_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn matches_cost() {
        let region = filter(r#"has(headers.region) && headers.region in ["eu", "us"]"#);
        let name = filter(r#"name.startsWith("temp")"#);
        let message_headers = headers(&[("region", "eu"), ("kind", "order"), ("trace", "abc")]);
        const ROUNDS: u32 = 200_000;
        const COMPILES: u32 = 500;
        let started = std::time::Instant::now();
        for _ in 0..COMPILES {
            filter(std::hint::black_box(
                r#"has(headers.kind) && headers.kind == "x""#,
            ));
        }
        println!(
            "compile: {} us per Filter::compile",
            started.elapsed().as_micros() / u128::from(COMPILES)
        );
        let simple = filter(r#"headers.region == "eu""#);
        let list = filter(r#"name in ["temperature", "us"]"#);
        let has = filter(r#"has(headers.region)"#);
        for (label, filter) in [
            ("headers", &region),
            ("name", &name),
            ("simple", &simple),
            ("list", &list),
            ("has", &has),
        ] {
            let started = std::time::Instant::now();
            let mut matched = 0u32;
            for _ in 0..ROUNDS {
                matched += u32::from(filter.matches(
                    std::hint::black_box(Some("temperature")),
                    std::hint::black_box(&message_headers),
                ));
            }
            let elapsed = started.elapsed();
            assert_eq!(matched, ROUNDS);
            println!(
                "{label}: {:?}: {} ns per matches()",
                filter.source(),
                elapsed.as_nanos() / u128::from(ROUNDS)
            );
        }
    }
}
