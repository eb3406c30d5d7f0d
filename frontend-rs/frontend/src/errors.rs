//! OpenAI error bodies, `{"error": {"message", "type", "param", "code"}}`, with the Python
//! server's status-to-type names (shoal/api/asgi.py `error_body`).

use crate::json::{write_i64, write_opt_str, write_str};

/// Answer a request with `status` and an OpenAI error body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    /// `Retry-After` seconds, when the client should retry (503 of admission, shutdown).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400 naming `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param.to_string()),
            retry_after: None,
        }
    }

    /// 400 from a `"field: message"` text: the param is the field, as the Python server's
    /// `validation_param` finds it.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        let message = message.into();
        let param = validation_param(&message);
        ApiError {
            status: 400,
            message,
            param,
            retry_after: None,
        }
    }

    /// The engine failed the request (finish reason "error"): 500, details in the log.
    pub fn internal() -> ApiError {
        ApiError::new(500, "internal server error (see the server log)")
    }

    /// The engine is gone (`EngineDeadError`): 503.
    pub fn engine_unavailable(reason: &str) -> ApiError {
        ApiError::new(503, format!("the engine is not available: {reason}"))
    }

    pub fn with_retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn body(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.message.len() + 96);
        write_error_body(&mut buf, self.status, &self.message, self.param.as_deref());
        buf
    }
}

/// The OpenAI error type name of a status (shoal/api/asgi.py `_ERROR_TYPES`).
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        413 => "RequestTooLargeError",
        500 => "InternalServerError",
        503 => "ServiceUnavailableError",
        _ => "Error",
    }
}

pub fn write_error_body(buf: &mut Vec<u8>, status: u16, message: &str, param: Option<&str>) {
    buf.extend_from_slice(b"{\"error\":{\"message\":");
    write_str(buf, message);
    buf.extend_from_slice(b",\"type\":");
    write_str(buf, error_type(status));
    buf.extend_from_slice(b",\"param\":");
    write_opt_str(buf, param);
    buf.extend_from_slice(b",\"code\":");
    write_i64(buf, status as i64);
    buf.extend_from_slice(b"}}");
}

/// The field a validation message names (shoal/api/protocol.py `validation_param`):
/// "Expected `int`, got `str` - at `$.max_tokens`" -> max_tokens; "Object missing required
/// field `messages`" -> messages; "top_p: must be ..." -> top_p.
pub fn validation_param(message: &str) -> Option<String> {
    let path = message.find(" - at `$").map(|i| {
        let rest = &message[i + " - at `$".len()..];
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        rest[..rest.find('`').unwrap_or(rest.len())].to_string()
    });
    let missing = message.find("missing required field `").map(|i| {
        let rest = &message[i + "missing required field `".len()..];
        rest[..rest.find('`').unwrap_or(rest.len())].to_string()
    });
    match (path, missing) {
        (Some(p), Some(m)) => return Some(format!("{p}.{m}")),
        (Some(p), None) => return if p.is_empty() { None } else { Some(p) },
        (None, Some(m)) => return Some(m),
        (None, None) => {}
    }
    let (head, _) = message.split_once(':')?;
    let mut chars = head.chars();
    let first = chars.next()?;
    let ok = (first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '[' || c == ']');
    ok.then(|| head.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_python_shape() {
        let e = ApiError::bad("model", "The model `x` does not exist.");
        let e = ApiError { status: 404, ..e };
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}}"#
        );
        let e = ApiError::new(401, "no");
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"message":"no","type":"AuthenticationError","param":null,"code":401}}"#
        );
    }

    #[test]
    fn params_found_like_python() {
        assert_eq!(
            validation_param("Expected `int`, got `str` - at `$.max_tokens`").as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            validation_param("Object missing required field `messages`").as_deref(),
            Some("messages")
        );
        assert_eq!(
            validation_param("Object missing required field `text` - at `$.messages[0]`")
                .as_deref(),
            Some("messages[0].text")
        );
        assert_eq!(
            validation_param("top_p: must be in (0, 1]").as_deref(),
            Some("top_p")
        );
        assert_eq!(
            validation_param("messages[2].content: must be").as_deref(),
            Some("messages[2].content")
        );
        assert_eq!(validation_param("the request body: x").as_deref(), None);
        assert_eq!(validation_param("no colon here"), None);
    }
}
