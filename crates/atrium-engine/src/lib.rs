//! Atrium's embedded inference engine: one model per process, served over an
//! OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`), plus `/healthz` and `/metrics`.
//!
//! Kinds: `chat` (llama-architecture GGUF, CPU, candle), `embedding` (BERT
//! safetensors), and `simulated` (timing only, for load tests). The engine
//! knows nothing of tenants: the agent runs it, the gateway fronts it.

mod attention;
mod batcher;
pub mod chat;
mod detokenize;
pub mod embed;
mod fastmath;
pub mod kv;
mod linear;
mod llama;
pub mod logprobs;
pub mod metrics;
mod q8;
mod reply;
pub mod requantize;
mod responses;
mod server;
pub mod simulated;
pub mod structured;
mod template;
mod vocab;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use server::router;

/// Errors of the engine; the server maps each to an OpenAI-style error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded.
    #[error("cannot load the model: {0}")]
    Load(String),
    /// The request is wrong; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// The request names a model this engine does not serve.
    #[error("model {0:?} is not served here")]
    ModelNotFound(String),
    /// The endpoint does not apply to this engine's model kind.
    #[error("{0}")]
    WrongKind(String),
    /// Too many requests are waiting; retry later.
    #[error("engine busy: {0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

/// Which model the engine serves.
#[derive(Debug, Clone)]
pub enum EngineKind {
    Chat {
        gguf: PathBuf,
        limits: chat::ChatLimits,
    },
    Embedding {
        dir: PathBuf,
    },
    Simulated(simulated::SimulatedConfig),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub kind: EngineKind,
    /// The `model` name requests must use.
    pub served_name: String,
    pub listen: SocketAddr,
}

/// A loaded model, ready to serve. One per process, so the size of the
/// variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    Chat(chat::ChatModel),
    Embedding(embed::EmbeddingModel),
    Simulated(simulated::SimulatedEngine),
}

pub struct Engine {
    pub loaded: Loaded,
    pub served_name: String,
    pub metrics: Arc<metrics::EngineMetrics>,
    pub created: u64,
}

/// Loads the model named by `kind` (slow for real models: call it from a
/// blocking context).
pub fn load(kind: &EngineKind, served_name: &str) -> Result<Engine, EngineError> {
    let metrics = Arc::new(metrics::EngineMetrics::default());
    let loaded = match kind {
        EngineKind::Chat { gguf, limits } => {
            Loaded::Chat(chat::ChatModel::load(gguf, *limits, metrics.clone())?)
        }
        EngineKind::Embedding { dir } => {
            Loaded::Embedding(embed::EmbeddingModel::load(dir, metrics.clone())?)
        }
        EngineKind::Simulated(c) => {
            Loaded::Simulated(simulated::SimulatedEngine::new(c.clone(), metrics.clone()))
        }
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Engine {
        loaded,
        served_name: served_name.to_string(),
        metrics,
        created,
    })
}

/// Loads the model and serves it until `shutdown` resolves.
pub async fn serve(
    config: EngineConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), EngineError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| EngineError::Load(format!("cannot listen on {}: {e}", config.listen)))?;
    let kind = config.kind.clone();
    let name = config.served_name.clone();
    let engine = tokio::task::spawn_blocking(move || load(&kind, &name))
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
    tracing::info!(addr = %config.listen, model = %config.served_name, "engine ready");
    // Small writes (SSE chunks, short answers) must not wait on Nagle's
    // algorithm for the peer's delayed ACK (40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(Arc::new(engine)))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))
}
