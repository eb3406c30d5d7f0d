//! A chat template (a Jinja subset) compiled once and rendered per request, identically to
//! shoal's Python `render_chat` (jinja2). A template outside the subset fails at compile
//! time (start-up), never renders a wrong prompt.
//! STUB: API agreed for the workspace; bodies to be written.

pub struct ChatTemplate {
    _private: (),
}

impl ChatTemplate {
    /// Parse `source`; `Err` names what is unsupported (line and construct).
    pub fn compile(source: &str) -> Result<ChatTemplate, String> {
        let _ = source;
        Err("shoal-template: not implemented yet".into())
    }
    /// Render with the same variables as the Python side: `messages` (a JSON array of
    /// message objects as the API received them, after shoal's normalisation),
    /// `add_generation_prompt`, `bos_token`, `eos_token`, and `extra` (tools, ...; an
    /// object whose keys become variables). `Err` for a render-time error (e.g. the
    /// template's `raise_exception`), the message being the template's.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        extra: &serde_json::Value,
    ) -> Result<String, String> {
        let _ = (messages, add_generation_prompt, bos_token, eos_token, extra);
        unimplemented!()
    }
}
