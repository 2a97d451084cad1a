//! The greedy-agreement row of `atrium bench engine`: twenty chat prompts,
//! rendered and tokenized once by Atrium's engine, answered greedily (32
//! tokens) by Atrium's engine and by llama.cpp from the same token ids on
//! the same GGUF file; how many answers are the same text, and where each
//! other one first departs.

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use atrium_engine::chat::{ChatModel, GenerationEvent, Message, MessageContent, SamplingParams};
use serde::Serialize;

/// Tokens each answer runs to at most.
const ANSWER_TOKENS: usize = 32;

const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many days are in a leap year?",
    "Write a haiku about the sea.",
    "What does a CPU do?",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for 'happy'.",
    "What is 12 times 12?",
    "Explain photosynthesis in one sentence.",
    "Who wrote Romeo and Juliet?",
    "List two uses of a paperclip.",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "What is the largest planet in the solar system?",
    "How do you make a cup of tea?",
    "What is an API?",
    "Tell me a fun fact about octopuses.",
    "What is the square root of 81?",
];

/// Where one answer departs from llama.cpp's.
#[derive(Debug, Serialize)]
pub struct Difference {
    pub prompt: String,
    /// The first character (of the answers' texts) that differs.
    pub at_char: usize,
    pub ours: String,
    pub llama_cpp: String,
}

#[derive(Debug, Serialize)]
pub struct Agreement {
    pub prompts: usize,
    pub identical: usize,
    pub differences: Vec<Difference>,
}

/// Compares Atrium's greedy answers with llama.cpp's (run by `python`,
/// the llama-cpp-python venv's) on `gguf` with `threads` threads.
pub async fn agreement(
    chat: &ChatModel,
    python: &Path,
    gguf: &Path,
    threads: usize,
) -> Result<Agreement> {
    let mut prompts = Vec::with_capacity(PROMPTS.len());
    let mut ours = Vec::with_capacity(PROMPTS.len());
    for prompt in PROMPTS {
        let messages = [Message {
            role: "user".into(),
            content: MessageContent::Text(prompt.into()),
        }];
        let ids = chat.encode(&chat.render_chat(&messages)?)?;
        ours.push(answer(chat, ids.clone()).await?);
        prompts.push(ids);
    }
    let theirs = llama_cpp_answers(python, gguf, threads, &prompts)?;
    let mut differences = Vec::new();
    for ((prompt, a), b) in PROMPTS.iter().zip(&ours).zip(&theirs) {
        if a != b {
            let at_char = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
            differences.push(Difference {
                prompt: (*prompt).into(),
                at_char,
                ours: a.clone(),
                llama_cpp: b.clone(),
            });
        }
    }
    Ok(Agreement {
        prompts: PROMPTS.len(),
        identical: PROMPTS.len() - differences.len(),
        differences,
    })
}

/// Atrium's greedy answer to `ids`.
async fn answer(chat: &ChatModel, ids: Vec<u32>) -> Result<String> {
    let mut rx = chat.generate(ids, SamplingParams::greedy(ANSWER_TOKENS))?;
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Delta(d) => text.push_str(&d),
            GenerationEvent::Logprobs(_) => {}
            GenerationEvent::Done { .. } => return Ok(text),
            GenerationEvent::Failed(e) => bail!(e),
        }
    }
    bail!("the generation ended without Done")
}

/// llama.cpp's greedy answers from the same token ids (stopping at an
/// end-of-generation token, as Atrium's engine does).
const SCRIPT: &str = r#"
import json, sys
import llama_cpp
from llama_cpp import Llama
path, threads, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
answers = []
for ids in json.load(sys.stdin):
    llm.reset()
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) == limit:
            break
        out.append(t)
    answers.append(llm.detokenize(out).decode("utf-8", "replace"))
print(json.dumps(answers))
"#;

fn llama_cpp_answers(
    python: &Path,
    gguf: &Path,
    threads: usize,
    prompts: &[Vec<u32>],
) -> Result<Vec<String>> {
    let mut child = std::process::Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(gguf)
        .arg(threads.to_string())
        .arg(ANSWER_TOKENS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running llama-cpp-python")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&serde_json::to_vec(prompts)?)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "llama-cpp-python failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let answers: Vec<String> =
        serde_json::from_str(last).with_context(|| format!("llama-cpp-python printed {last:?}"))?;
    if answers.len() != prompts.len() {
        bail!(
            "llama-cpp-python answered {} of {} prompts",
            answers.len(),
            prompts.len()
        );
    }
    Ok(answers)
}
