//! A conversation checked and normalised exactly as shoal's Python `render_chat` does before
//! rendering (`validate_messages`, then `_adapt_tools`): same checks, same error texts,
//! same Hermes-style tool text for templates that ignore tool calls or tools.

use serde_json::{Map, Value as Json};

use crate::value::{json_dumps, JsonOptions, Value};

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// JSON's name for a value's type, as the Python errors say it (`_json_type`).
fn json_type(v: Option<&Json>) -> &'static str {
    match v {
        None | Some(Json::Null) => "null",
        Some(Json::Bool(_)) => "boolean",
        Some(Json::Number(_)) => "number",
        Some(Json::String(_)) => "string",
        Some(Json::Array(_)) => "array",
        Some(Json::Object(_)) => "object",
    }
}

/// Python's `type(x).__name__` of a decoded JSON value.
fn py_type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "NoneType",
        Json::Bool(_) => "bool",
        Json::Number(n) if n.is_f64() => "float",
        Json::Number(_) => "int",
        Json::String(_) => "str",
        Json::Array(_) => "list",
        Json::Object(_) => "dict",
    }
}

/// Python's `repr()` of a decoded JSON value (`None` for an absent one).
fn py_repr(v: Option<&Json>) -> String {
    v.map_or_else(
        || "None".to_string(),
        |v| Value::from_json(v).repr().unwrap_or_default(),
    )
}

/// `validate_messages`: a plain copy of the conversation the template can read, or the
/// Python side's `ValueError` text naming the message and field.
pub fn validate_messages(messages: &Json) -> Result<Vec<Map<String, Json>>, String> {
    let Json::Array(items) = messages else {
        return Err("messages: must be a list of {'role': ..., 'content': ...} mappings".into());
    };
    if items.is_empty() {
        return Err("messages: must not be empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| validate_message(i, m))
        .collect()
}

fn validate_message(index: usize, message: &Json) -> Result<Map<String, Json>, String> {
    let at = format!("messages[{}]", index);
    let Json::Object(fields) = message else {
        return Err(format!(
            "{}: must be a mapping with 'role' and 'content', got {}",
            at,
            py_type_name(message)
        ));
    };
    let role = match fields.get("role") {
        Some(Json::String(r)) if !r.is_empty() => r.as_str(),
        other => {
            return Err(format!(
                "{}.role: must be a non-empty string, got {}",
                at,
                py_repr(other)
            ))
        }
    };
    if !ROLES.contains(&role) {
        return Err(format!(
            "{}.role: must be one of ('system', 'user', 'assistant', 'tool', 'developer'), got {}",
            at,
            py_repr(fields.get("role"))
        ));
    }
    match fields.get("name") {
        None | Some(Json::Null) | Some(Json::String(_)) => {}
        other => {
            return Err(format!(
                "{}.name: must be a string, got {}",
                at,
                json_type(other)
            ))
        }
    }
    let mut plain = fields.clone();
    let has_tool_calls = check_tool_calls(&at, role, fields.get("tool_calls"))?;
    if role == "tool" {
        match fields.get("tool_call_id") {
            Some(Json::String(id)) if !id.is_empty() => {}
            other => {
                return Err(format!(
                    "{}.tool_call_id: a tool message needs the id (a string) of the tool call it answers, got {}",
                    at,
                    json_type(other)
                ))
            }
        }
    }
    match fields.get("content") {
        None | Some(Json::Null) if has_tool_calls => {
            plain.insert("content".into(), Json::String(String::new()));
        }
        Some(Json::Array(parts)) => {
            plain.insert("content".into(), Json::String(join_text_parts(&at, parts)?));
        }
        Some(Json::String(_)) => {}
        other => {
            let hint = if matches!(other, None | Some(Json::Null)) {
                " (null only on an assistant message with tool_calls)"
            } else {
                ""
            };
            return Err(format!(
                "{}.content: must be a string or a list of text parts, got {}{}",
                at,
                json_type(other),
                hint
            ));
        }
    }
    Ok(plain)
}

/// Whether the message has tool calls; `Err` unless they have OpenAI's shape.
fn check_tool_calls(at: &str, role: &str, tool_calls: Option<&Json>) -> Result<bool, String> {
    let calls = match tool_calls {
        None | Some(Json::Null) => return Ok(false),
        Some(Json::Array(calls)) if calls.is_empty() => return Ok(false),
        Some(other) => other,
    };
    if role != "assistant" {
        return Err(format!(
            "{}.tool_calls: only assistant messages have tool_calls",
            at
        ));
    }
    let Json::Array(calls) = calls else {
        return Err(format!(
            "{}.tool_calls: must be a list, got {}",
            at,
            json_type(Some(calls))
        ));
    };
    for (j, call) in calls.iter().enumerate() {
        let at = format!("{}.tool_calls[{}]", at, j);
        let Json::Object(call) = call else {
            return Err(format!(
                "{}: must be a mapping, got {}",
                at,
                json_type(Some(call))
            ));
        };
        if !matches!(call.get("id"), Some(Json::String(_))) {
            return Err(format!("{}.id: must be a string", at));
        }
        match call.get("type") {
            None => {}
            Some(Json::String(t)) if t == "function" => {}
            other => {
                return Err(format!(
                    "{}.type: must be 'function', got {}",
                    at,
                    py_repr(other)
                ))
            }
        }
        let Some(Json::Object(function)) = call.get("function") else {
            return Err(format!(
                "{}.function: must be a mapping with 'name' and 'arguments'",
                at
            ));
        };
        for key in ["name", "arguments"] {
            if !matches!(function.get(key), Some(Json::String(_))) {
                return Err(format!("{}.function.{}: must be a string", at, key));
            }
        }
    }
    Ok(true)
}

fn join_text_parts(at: &str, parts: &[Json]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let is_text =
            matches!(part, Json::Object(p) if p.get("type") == Some(&Json::String("text".into())));
        if !is_text {
            return Err(format!(
                "{}.content[{}]: only {{'type': 'text', 'text': ...}} parts are supported",
                at, j
            ));
        }
        match part.get("text") {
            Some(Json::String(t)) => texts.push(t.as_str()),
            _ => return Err(format!("{}.content[{}].text: must be a string", at, j)),
        }
    }
    Ok(texts.join("\n"))
}

/// Python's `json.dumps(value, ensure_ascii=False)`.
fn dumps(v: &Json) -> Result<String, String> {
    let opts = JsonOptions {
        ensure_ascii: false,
        indent: None,
        item_sep: ", ".into(),
        key_sep: ": ".into(),
        sort_keys: false,
    };
    json_dumps(&Value::from_json(v), &opts)
}

/// Python's truthiness of a decoded JSON value.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64() != Some(0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(o) => !o.is_empty(),
    }
}

/// `tools_system_prompt` (shoal.processing.tool_parsers): the Hermes-style instructions a
/// template that ignores `tools` gets as a system message.
pub fn tools_system_prompt(tools: &Json) -> Result<String, String> {
    let listed: Vec<String> = match tools {
        Json::Array(items) => items.iter().map(dumps).collect::<Result<_, _>>()?,
        // Iterating a mapping gives its keys, as in Python.
        Json::Object(map) => map
            .keys()
            .map(|k| dumps(&Json::String(k.clone())))
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "tools: must be a list, got {}",
                json_type(Some(other))
            ))
        }
    };
    Ok(format!(
        "You may call one or more functions to assist with the user query. The functions are listed within <tools></tools> tags:\n<tools>\n{}\n</tools>\nFor each function call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        listed.join("\n")
    ))
}

/// `tool_calls_as_text`: an assistant message's calls as `<tool_call>` blocks.
pub fn tool_calls_as_text(calls: &[Json]) -> Result<String, String> {
    let mut blocks = Vec::with_capacity(calls.len());
    for call in calls {
        let function = call.get("function").unwrap_or(&Json::Null);
        let name = function.get("name").cloned().unwrap_or(Json::Null);
        let raw = function
            .get("arguments")
            .and_then(Json::as_str)
            .unwrap_or_default();
        // Arguments that are not JSON stay the string they are (Python's ValueError path).
        if python_json_differs(raw) {
            return Err(format!(
                "tool call arguments {:?}: NaN/Infinity, lone surrogates or integers beyond 64 bits are not supported by shoal's template subset",
                raw
            ));
        }
        let args = match serde_json::from_str::<Json>(raw) {
            Ok(v) => v,
            // Python's json.loads gives inf where serde_json refuses the number: refuse too.
            Err(e) if e.to_string().contains("out of range") => {
                return Err(format!("tool call arguments {:?}: a number out of range is not supported by shoal's template subset", raw))
            }
            Err(_) => Json::String(raw.to_string()),
        };
        let mut obj = Map::new();
        obj.insert("name".into(), name);
        obj.insert("arguments".into(), args);
        blocks.push(format!(
            "<tool_call>\n{}\n</tool_call>",
            dumps(&Json::Object(obj))?
        ));
    }
    Ok(blocks.join("\n"))
}

/// Whether Python's `json.loads` + `json.dumps` might differ from serde_json on `raw`: its
/// NaN/Infinity extensions, lone surrogate escapes, integers beyond 64 bits (exact in
/// Python, floats in serde_json). Such input is refused rather than rendered differently.
fn python_json_differs(raw: &str) -> bool {
    if raw.contains("NaN") || raw.contains("Infinity") || raw.to_ascii_lowercase().contains("\\ud")
    {
        return true;
    }
    // Integer literals (outside strings) of more than 18 digits.
    let mut in_string = false;
    let mut escaped = false;
    let mut token = String::new();
    for c in raw.chars().chain(std::iter::once(' ')) {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-') {
            token.push(c);
            continue;
        }
        let digits = token.chars().filter(char::is_ascii_digit).count();
        if digits > 18 && !token.contains(['.', 'e', 'E']) {
            return true;
        }
        token.clear();
        in_string = c == '"';
    }
    false
}

/// `validate_messages` then `_adapt_tools`: the conversation exactly as shoal's Python
/// renderer hands it to `template` (its source), given the request's `tools` (or none).
pub fn prepare_messages(
    template: &str,
    messages: &Json,
    tools: Option<&Json>,
) -> Result<Json, String> {
    let mut checked = validate_messages(messages)?;
    if !template.contains("tool_calls") {
        for message in checked.iter_mut() {
            let calls = message.remove("tool_calls");
            if let Some(Json::Array(calls)) = calls.filter(truthy) {
                let text = tool_calls_as_text(&calls)?;
                let content = message
                    .get("content")
                    .and_then(Json::as_str)
                    .unwrap_or_default();
                let joined = if content.is_empty() {
                    text
                } else {
                    format!("{}\n{}", content, text)
                };
                message.insert("content".into(), Json::String(joined));
            }
        }
    }
    if let Some(tools) = tools.filter(|t| truthy(t)) {
        if !template.contains("tools") {
            let prompt = tools_system_prompt(tools)?;
            if checked[0].get("role").and_then(Json::as_str) == Some("system") {
                let content = checked[0]
                    .get("content")
                    .and_then(Json::as_str)
                    .unwrap_or_default();
                let joined = format!("{}\n\n{}", content, prompt);
                checked[0].insert("content".into(), Json::String(joined));
            } else {
                let mut system = Map::new();
                system.insert("role".into(), Json::String("system".into()));
                system.insert("content".into(), Json::String(prompt));
                checked.insert(0, system);
            }
        }
    }
    Ok(Json::Array(checked.into_iter().map(Json::Object).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_errors_match_python_texts() {
        let cases = [
            (json!("x"), "messages: must be a list of {'role': ..., 'content': ...} mappings"),
            (json!([]), "messages: must not be empty"),
            (json!([3]), "messages[0]: must be a mapping with 'role' and 'content', got int"),
            (json!([{"role": null}]), "messages[0].role: must be a non-empty string, got None"),
            (
                json!([{"role": "bot", "content": "x"}]),
                "messages[0].role: must be one of ('system', 'user', 'assistant', 'tool', 'developer'), got 'bot'",
            ),
            (
                json!([{"role": "user"}]),
                "messages[0].content: must be a string or a list of text parts, got null (null only on an assistant message with tool_calls)",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image"}]}]),
                "messages[0].content[0]: only {'type': 'text', 'text': ...} parts are supported",
            ),
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].tool_call_id: a tool message needs the id (a string) of the tool call it answers, got null",
            ),
        ];
        for (messages, want) in cases {
            assert_eq!(validate_messages(&messages).unwrap_err(), want);
        }
    }

    #[test]
    fn tool_calls_become_hermes_text_for_templates_that_ignore_them() {
        let messages = json!([
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1.0, \"y\": \"é\"}"}}
            ]},
        ]);
        let out = prepare_messages("{{ messages }}", &messages, None).unwrap();
        assert_eq!(
            out[1]["content"],
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1.0, \"y\": \"é\"}}\n</tool_call>"
        );
        assert!(out[1].get("tool_calls").is_none());
        // A template that reads tool_calls gets them as they are.
        let kept = prepare_messages("{{ tool_calls }}", &messages, None).unwrap();
        assert_eq!(kept[1]["content"], "");
        assert!(kept[1].get("tool_calls").is_some());
    }

    #[test]
    fn arguments_python_would_read_differently_are_refused() {
        assert!(python_json_differs("{\"a\": 12345678901234567890}"));
        assert!(python_json_differs("{\"a\": NaN}"));
        assert!(!python_json_differs(
            "{\"a\": \"12345678901234567890\", \"b\": 1.5e300}"
        ));
    }

    #[test]
    fn tools_become_a_system_prompt() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let out = prepare_messages(
            "x",
            &json!([{"role": "user", "content": "q"}]),
            Some(&tools),
        )
        .unwrap();
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"].as_str().unwrap().contains(
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\"}}\n</tools>"
        ));
    }
}
