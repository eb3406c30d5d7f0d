//! `SamplingParams::check`: the value checks of the Python `SamplingParams.__post_init__`, in
//! its order and with its messages, so that a front end can answer 400 before sending (an
//! engine drops a request whose parameters fail them as a malformed frame, unanswered).

use crate::SamplingParams;

/// The embedding poolings an engine knows (`shoal.sampling_params.POOLING_TYPES`).
pub const POOLING_TYPES: [&str; 2] = ["mean", "last"];

fn require(ok: bool, name: &str, msg: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{name}: {msg}"))
    }
}

impl SamplingParams {
    /// Ok, or the first failed check as Python words it (`"top_p: must be in (0, 1]"`).
    /// Comparisons are written as Python's, so NaN fails every range check as it does there.
    pub fn check(&self) -> Result<(), String> {
        let top_k = if self.top_k == -1 { 0 } else { self.top_k };
        require(self.n >= 1, "n", "must be at least 1")?;
        require(
            self.temperature >= 0.0,
            "temperature",
            "must be non-negative",
        )?;
        require(
            0.0 < self.top_p && self.top_p <= 1.0,
            "top_p",
            "must be in (0, 1]",
        )?;
        require(top_k >= 0, "top_k", "must be -1 (disabled) or positive")?;
        require(
            0.0 <= self.min_p && self.min_p <= 1.0,
            "min_p",
            "must be in [0, 1]",
        )?;
        if let Some(max_tokens) = self.max_tokens {
            require(max_tokens >= 0, "max_tokens", "must be non-negative")?;
        }
        require(self.min_tokens >= 0, "min_tokens", "must be non-negative")?;
        if let Some(max_tokens) = self.max_tokens {
            require(
                self.min_tokens <= max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            )?;
        }
        let all_nonempty = |words: &[String]| words.iter().all(|w| !w.is_empty());
        require(
            all_nonempty(&self.stop),
            "stop",
            "must be non-empty strings",
        )?;
        if let Some(logprobs) = self.logprobs {
            require(
                (0..=20).contains(&logprobs),
                "logprobs",
                "must be in [0, 20]",
            )?;
        }
        self.check_controls()
    }

    fn check_controls(&self) -> Result<(), String> {
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            require((-2.0..=2.0).contains(&value), name, "must be in [-2, 2]")?;
        }
        require(
            self.repetition_penalty > 0.0,
            "repetition_penalty",
            "must be positive",
        )?;
        if let Some(bias) = &self.logit_bias {
            let in_range = bias.values().all(|b| (-100.0..=100.0).contains(b));
            require(in_range, "logit_bias", "biases must be in [-100, 100]")?;
            require(
                bias.keys().all(|t| *t >= 0),
                "logit_bias",
                "negative token id",
            )?;
        }
        if let Some(allowed) = &self.allowed_token_ids {
            require(
                !allowed.is_empty(),
                "allowed_token_ids",
                "must not be empty",
            )?;
            let non_negative = allowed.iter().all(|t| *t >= 0);
            require(non_negative, "allowed_token_ids", "negative token id")?;
        }
        let bad_words_ok = self.bad_words.iter().all(|w| !w.is_empty());
        require(bad_words_ok, "bad_words", "must be non-empty strings")?;
        if let Some(prompt_logprobs) = self.prompt_logprobs {
            let in_range = (0..=20).contains(&prompt_logprobs);
            require(in_range, "prompt_logprobs", "must be in [0, 20]")?;
        }
        if let Some(pooling) = &self.pooling {
            let known = POOLING_TYPES.contains(&pooling.as_str());
            require(known, "pooling", "must be one of ('mean', 'last')")?;
            let prompt_only = self.max_tokens == Some(0);
            require(
                prompt_only,
                "max_tokens",
                "must be 0 for an embedding request",
            )?;
        }
        Ok(())
    }
}
