//! Chat messages: checked and normalised as shoal/processing/chat_template.py does
//! (`validate_messages`, `_adapt_tools` for templates without tool calls), then rendered
//! with the compiled template; every failure a 400 naming the message or the template.

use serde_json::{Map, Value};
use shoal_template::ChatTemplate;

use crate::errors::ApiError;
use crate::state::AppState;

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];
const MAX_DETAIL_CHARS: usize = 300;

/// JSON's names for a decoded value's type (`_json_type`).
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Python's `repr` of a JSON value, for the few messages that show one.
fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        other => other.to_string(),
    }
}

/// `validate_messages`: a plain copy the template can read, or the 400 naming the field.
pub fn validate_messages(messages: &Value) -> Result<Vec<Value>, ApiError> {
    let list = match messages {
        Value::Array(a) => a,
        _ => {
            return Err(ApiError::invalid(
                "messages: must be a list of {'role': ..., 'content': ...} mappings",
            ))
        }
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages: must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| validate_message(i, m))
        .collect()
}

fn validate_message(index: usize, message: &Value) -> Result<Value, ApiError> {
    let at = format!("messages[{index}]");
    let m = match message {
        Value::Object(m) => m,
        other => {
            let name = match other {
                Value::Null => "NoneType",
                Value::Bool(_) => "bool",
                Value::Number(n) if n.is_f64() => "float",
                Value::Number(_) => "int",
                Value::String(_) => "str",
                _ => "list",
            };
            return Err(ApiError::invalid(format!(
                "{at}: must be a mapping with 'role' and 'content', got {name}"
            )));
        }
    };
    let role = m.get("role").unwrap_or(&Value::Null);
    let role_str = match role {
        Value::String(s) if !s.is_empty() => s.as_str(),
        _ => {
            return Err(ApiError::invalid(format!(
                "{at}.role: must be a non-empty string, got {}",
                py_repr(role)
            )))
        }
    };
    if !ROLES.contains(&role_str) {
        return Err(ApiError::invalid(format!(
            "{at}.role: must be one of ('system', 'user', 'assistant', 'tool', 'developer'), got {}",
            py_repr(role)
        )));
    }
    if let Some(name) = m.get("name") {
        if !name.is_null() && !name.is_string() {
            return Err(ApiError::invalid(format!(
                "{at}.name: must be a string, got {}",
                json_type(name)
            )));
        }
    }
    let mut plain = m.clone();
    let has_tool_calls = check_tool_calls(&at, role_str, m.get("tool_calls"))?;
    if role_str == "tool" {
        let call_id = m.get("tool_call_id").unwrap_or(&Value::Null);
        if !matches!(call_id, Value::String(s) if !s.is_empty()) {
            return Err(ApiError::invalid(format!(
                "{at}.tool_call_id: a tool message needs the id (a string) of the tool call it answers, got {}",
                json_type(call_id)
            )));
        }
    }
    let content = m.get("content").unwrap_or(&Value::Null);
    match content {
        Value::Null if has_tool_calls => {
            plain.insert("content".into(), Value::String(String::new()));
        }
        Value::Array(parts) => {
            plain.insert(
                "content".into(),
                Value::String(join_text_parts(&at, parts)?),
            );
        }
        Value::String(_) => {}
        other => {
            let hint = if other.is_null() {
                " (null only on an assistant message with tool_calls)"
            } else {
                ""
            };
            return Err(ApiError::invalid(format!(
                "{at}.content: must be a string or a list of text parts, got {}{hint}",
                json_type(other)
            )));
        }
    }
    Ok(Value::Object(plain))
}

fn check_tool_calls(at: &str, role: &str, calls: Option<&Value>) -> Result<bool, ApiError> {
    let calls = match calls {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Array(a)) if a.is_empty() => return Ok(false),
        Some(c) => c,
    };
    if role != "assistant" {
        return Err(ApiError::invalid(format!(
            "{at}.tool_calls: only assistant messages have tool_calls"
        )));
    }
    let list = match calls {
        Value::Array(a) => a,
        other => {
            return Err(ApiError::invalid(format!(
                "{at}.tool_calls: must be a list, got {}",
                json_type(other)
            )))
        }
    };
    for (j, call) in list.iter().enumerate() {
        let here = format!("{at}.tool_calls[{j}]");
        let c = match call {
            Value::Object(c) => c,
            other => {
                return Err(ApiError::invalid(format!(
                    "{here}: must be a mapping, got {}",
                    json_type(other)
                )))
            }
        };
        if !c.get("id").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(format!("{here}.id: must be a string")));
        }
        if let Some(t) = c.get("type") {
            if t.as_str() != Some("function") {
                return Err(ApiError::invalid(format!(
                    "{here}.type: must be 'function', got {}",
                    py_repr(t)
                )));
            }
        }
        let f = match c.get("function") {
            Some(Value::Object(f)) => f,
            _ => {
                return Err(ApiError::invalid(format!(
                    "{here}.function: must be a mapping with 'name' and 'arguments'"
                )))
            }
        };
        for key in ["name", "arguments"] {
            if !f.get(key).is_some_and(Value::is_string) {
                return Err(ApiError::invalid(format!(
                    "{here}.function.{key}: must be a string"
                )));
            }
        }
    }
    Ok(true)
}

fn join_text_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let ok = matches!(part, Value::Object(p) if p.get("type").and_then(Value::as_str) == Some("text"));
        if !ok {
            return Err(ApiError::invalid(format!(
                "{at}.content[{j}]: only {{'type': 'text', 'text': ...}} parts are supported"
            )));
        }
        match part.get("text") {
            Some(Value::String(t)) => texts.push(t.as_str()),
            _ => {
                return Err(ApiError::invalid(format!(
                    "{at}.content[{j}].text: must be a string"
                )))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// Python's `json.dumps(x, ensure_ascii=False)` (separators ", " and ": ").
fn py_dumps(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                py_dumps(x, out);
            }
            out.push(b']');
        }
        Value::Object(o) => {
            out.push(b'{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                crate::json::write_str(out, k);
                out.extend_from_slice(b": ");
                py_dumps(x, out);
            }
            out.push(b'}');
        }
        Value::String(s) => crate::json::write_str(out, s),
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// `tool_calls_as_text`: an assistant's tool calls as `<tool_call>` blocks (Hermes' format).
fn tool_calls_as_text(calls: &[Value]) -> String {
    let mut blocks = Vec::with_capacity(calls.len());
    for call in calls {
        let f = &call["function"];
        let raw = f["arguments"].as_str().unwrap_or_default();
        let args =
            serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let mut body = Vec::new();
        body.extend_from_slice(b"{\"name\": ");
        crate::json::write_str(&mut body, f["name"].as_str().unwrap_or_default());
        body.extend_from_slice(b", \"arguments\": ");
        py_dumps(&args, &mut body);
        body.push(b'}');
        blocks.push(format!(
            "<tool_call>\n{}\n</tool_call>",
            String::from_utf8_lossy(&body)
        ));
    }
    blocks.join("\n")
}

/// `_adapt_tools` without `tools` (refused earlier): for a template that never reads
/// `tool_calls`, an assistant message's calls become text in its content.
fn adapt_tool_calls(source_has_tool_calls: bool, messages: &mut [Value]) {
    if source_has_tool_calls {
        return;
    }
    for m in messages.iter_mut() {
        let obj = match m.as_object_mut() {
            Some(o) => o,
            None => continue,
        };
        if let Some(Value::Array(calls)) = obj.remove("tool_calls") {
            if calls.is_empty() {
                continue;
            }
            let text = tool_calls_as_text(&calls);
            let content = obj
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let joined = if content.is_empty() {
                text
            } else {
                format!("{content}\n{text}")
            };
            obj.insert("content".into(), Value::String(joined));
        }
    }
}

fn describe(message: &str) -> String {
    if message.chars().count() > MAX_DETAIL_CHARS {
        let head: String = message.chars().take(MAX_DETAIL_CHARS - 3).collect();
        format!("{head}...")
    } else {
        message.to_string()
    }
}

/// The conversation rendered as prompt text; 400s name the message or the template.
pub fn render(
    state: &AppState,
    messages: &Value,
    add_generation_prompt: bool,
    request_template: Option<&str>,
    kwargs: &Map<String, Value>,
) -> Result<String, ApiError> {
    let mut checked = validate_messages(messages)?;
    let compiled_here;
    let (template, source_has_tool_calls): (&ChatTemplate, bool) = match request_template {
        Some(source) => {
            compiled_here = ChatTemplate::compile(source)
                .map_err(|e| ApiError::invalid(format!("chat_template: {}", describe(&e))))?;
            (&compiled_here, source.contains("tool_calls"))
        }
        None => match &state.chat_template {
            Some(t) => (t, state.chat_template_reads_tool_calls),
            None => {
                return Err(ApiError::invalid(format!(
                    "chat_template: the tokenizer of {} has none; pass one explicitly",
                    py_repr(&Value::String(state.model_root.clone()))
                )))
            }
        },
    };
    adapt_tool_calls(source_has_tool_calls, &mut checked);
    let special = state.tokenizer.special_tokens();
    // Template kwargs override the special tokens of the same name.
    let token = |name: &str, default: &Option<String>| -> Option<String> {
        match kwargs.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => None,
            None => default.clone(),
        }
    };
    let bos = token("bos_token", &special.bos_token);
    let eos = token("eos_token", &special.eos_token);
    let mut extra = kwargs.clone();
    for (name, value) in [
        ("unk_token", &special.unk_token),
        ("pad_token", &special.pad_token),
    ] {
        if !extra.contains_key(name) {
            extra.insert(
                name.into(),
                value.clone().map_or(Value::Null, Value::String),
            );
        }
    }
    let extra = Value::Object(extra);
    let run = |msgs: &[Value]| {
        template.render(
            &Value::Array(msgs.to_vec()),
            add_generation_prompt,
            bos.as_deref(),
            eos.as_deref(),
            &extra,
        )
    };
    match run(&checked) {
        Ok(text) => Ok(text),
        Err(error) => {
            // Name the message where rendering starts to fail with this error, when one does
            // (`_render_error`): the messages before it render, adding it fails the same way.
            // (Python names only a message the template read; a template that fails even
            // without messages never read one, so the error is the template's.)
            let culprit = (0..checked.len())
                .find(|&k| run(&checked[..k + 1]).err().as_deref() == Some(error.as_str()));
            let detail = describe(&error);
            if let Some(k) = culprit {
                if run(&checked[..k]).is_ok() {
                    let role = checked[k]["role"].as_str().unwrap_or("");
                    return Err(ApiError::invalid(format!(
                        "messages[{k}]: the chat template cannot render this {role} message: {detail}"
                    )));
                }
            }
            Err(ApiError::invalid(format!("chat_template: {detail}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_normalised_like_python() {
        let out = validate_messages(&json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "r"}
        ]))
        .unwrap();
        assert_eq!(out[0]["content"], "a\nb");
        assert_eq!(out[1]["content"], "");
    }

    #[test]
    fn bad_messages_name_the_field() {
        let e = validate_messages(&json!([{"role": "user", "content": 3}])).unwrap_err();
        assert_eq!(
            e.message,
            "messages[0].content: must be a string or a list of text parts, got number"
        );
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = validate_messages(&json!([{"role": "bot", "content": "x"}])).unwrap_err();
        assert!(
            e.message.starts_with("messages[0].role: must be one of ("),
            "{}",
            e.message
        );
        assert!(e.message.ends_with("got 'bot'"), "{}", e.message);
        let e = validate_messages(&json!([])).unwrap_err();
        assert_eq!(e.message, "messages: must not be empty");
        let e = validate_messages(&json!([{"role": "user", "content": null}])).unwrap_err();
        assert!(e
            .message
            .ends_with("got null (null only on an assistant message with tool_calls)"));
        let e = validate_messages(&json!([{"role": "tool", "content": "x"}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_call_id"));
    }

    #[test]
    fn tool_calls_become_text() {
        let mut msgs = vec![json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]})];
        adapt_tool_calls(false, &mut msgs);
        assert_eq!(
            msgs[0]["content"],
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>"
        );
        assert!(msgs[0].get("tool_calls").is_none());
    }
}
