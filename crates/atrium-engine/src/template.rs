//! A chat model's prompt format, from its own Jinja template (GGUF
//! `tokenizer.chat_template`, as the Hugging Face tokenizer applies it)
//! rendered with minijinja and its Python-compatible methods
//! (`.strip()`, `.startswith()`, `.items()`), rather than a format written
//! by hand for one family of models.
//!
//! The template comes with the model file, which a tenant may bring, so
//! it is treated as untrusted code: it runs on a bounded budget of
//! instructions (a loop without end is stopped, not waited on), its
//! output is bounded, and what it raises (`raise_exception`, as templates
//! refuse roles out of turn) is the request's error, not the engine's.

use minijinja::value::Value;
use minijinja::{context, Environment, Error, ErrorKind};

use crate::EngineError;

/// ChatML, for a model whose file carries no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
                      message['content'] + '<|im_end|>\n' }}{% endfor %}\
                      {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Instructions one rendering may run: hundreds of turns of any template
/// seen in the wild take a small fraction of it.
const FUEL: u64 = 2_000_000;

/// The longest prompt a template may produce, in bytes.
const MAX_PROMPT_BYTES: usize = 4 << 20;

pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The model's template (ChatML when it has none), checked to compile
    /// when the model loads, with the special tokens it may name.
    pub(crate) fn new(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, EngineError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.unwrap_or(CHATML).to_string())
            .map_err(|e| EngineError::Load(format!("the model's chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages` (role, content), ready for the
    /// assistant's turn.
    pub(crate) fn render(&self, messages: &[(String, String)]) -> Result<String, EngineError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        let refused = |e: Error| match e.kind() {
            // What the template raised is its answer to these messages.
            ErrorKind::InvalidOperation => EngineError::BadRequest(e.detail().map_or_else(
                || e.to_string(),
                |d| format!("the model's chat template: {d}"),
            )),
            ErrorKind::OutOfFuel => EngineError::BadRequest(
                "the model's chat template ran too long on these messages".into(),
            ),
            _ => EngineError::BadRequest(format!("the model's chat template failed: {e}")),
        };
        let prompt = self
            .env
            .get_template("chat")
            .and_then(|t| {
                t.render(context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                })
            })
            .map_err(refused)?;
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(EngineError::BadRequest(format!(
                "the model's chat template made a prompt of {} bytes; at most {MAX_PROMPT_BYTES}",
                prompt.len()
            )));
        }
        Ok(prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF file carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's, shortened: the BOS token, `| trim`, and a header per turn.
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

    /// Mistral's way of refusing turns out of order, with Python methods.
    const ALTERNATING: &str = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' if message['role'] == 'user' else message['content'] }}{% endfor %}";

    fn turns(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn smollm2s_own_template_gives_its_default_system_prompt_unless_one_is_sent() {
        let t = ChatTemplate::new(Some(SMOLLM2), "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&turns(&[("user", "Hi")])).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&turns(&[("system", "Be brief."), ("user", "Hi")]))
                .unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn other_families_render_as_their_templates_say() {
        let t = ChatTemplate::new(Some(LLAMA3), "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            t.render(&turns(&[("user", "  Hi  ")])).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let t = ChatTemplate::new(None, "", "").unwrap();
        assert_eq!(
            t.render(&turns(&[("user", "Hi")])).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn what_a_template_raises_is_a_bad_request_naming_it() {
        let t = ChatTemplate::new(Some(ALTERNATING), "", "").unwrap();
        assert_eq!(
            t.render(&turns(&[("user", " a "), ("assistant", "b")]))
                .unwrap(),
            "[INST] a [/INST]b"
        );
        let Err(EngineError::BadRequest(said)) = t.render(&turns(&[("assistant", "b")])) else {
            panic!("a turn out of order renders")
        };
        assert!(said.contains("roles must alternate"), "{said}");
    }

    #[test]
    fn a_hostile_template_is_stopped_not_waited_on_and_a_broken_one_never_loads() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}\
                       {% endfor %}{% endfor %}";
        let t = ChatTemplate::new(Some(endless), "", "").unwrap();
        let started = std::time::Instant::now();
        let Err(EngineError::BadRequest(said)) = t.render(&turns(&[("user", "x")])) else {
            panic!("an endless template renders")
        };
        assert!(said.contains("ran too long"), "{said}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));

        let huge = "{% for i in range(100000) %}{{ messages[0]['content'] }}{% endfor %}";
        let t = ChatTemplate::new(Some(huge), "", "").unwrap();
        let long = "x".repeat(100);
        assert!(t.render(&turns(&[("user", &long)])).is_err());

        assert!(matches!(
            ChatTemplate::new(Some("{% for %}"), "", ""),
            Err(EngineError::Load(_))
        ));
    }
}
