//! Training configuration: every option is a CLI flag and a key of the TOML/JSON config file.
//!
//! Resolution order: built-in defaults < `--config FILE` < flags given on the command line.
//! The resolved config is saved with the run (`config.json`) and is what `--resume` reads back.

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::sparsify::threshold::Calibration;
/// The sparsifier's own types live in `sparsify/`; they are re-exported here because they are
/// options.
pub use crate::sparsify::{AuxKind, BudgetKind, SparsifierKind, ZipfRounding};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdMode {
    /// One theta per latent (default: keeps each latent's firing rate near its budget).
    #[value(alias = "per_latent")]
    #[serde(alias = "per-latent")]
    PerLatent,
    /// One scalar theta (the WTA paper's choice: min over latents).
    Global,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    Mean,
    #[value(alias = "geometric_median")]
    #[serde(alias = "geometric-median")]
    GeometricMedian,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    Auto,
    Cpu,
    Cuda,
    /// The CUDA backend with every kernel run by the host emulator: for checking, very slow.
    #[value(alias = "cuda_emulator")]
    #[serde(alias = "cuda-emulator")]
    CudaEmulator,
}

/// Precision of the encoder product on GPUs (the CPU backend always uses f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Tf32,
    Bf16,
}

/// Whether decoder rows are held at unit norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DecoderNorm {
    /// Project each decoder gradient row onto the row's tangent space, renormalise after each
    /// step (WTA paper 3.1, Gao et al., dictionary_learning).
    Unit,
    /// No projection, no renormalisation: the norms are free, and relu's L1 weighted by
    /// ||W_dec_i|| is what keeps them in check (the bimodality paper's setting).
    Free,
}

/// How a backend computes the products with the codes (decode, dL/dz, the two weight
/// gradients): as sparse gathers (cost nnz x d) or as dense GEMMs (cost B x F x d, at GEMM speed).
/// The CUDA backend applies it to the main codes (backend/cuda/dense.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DenseCodes {
    /// Per step from the codes' density: dense above `backend::cpu::dense::DENSE_ABOVE` (for the
    /// aux codes: their density within the candidates); CUDA: above
    /// `backend::cuda::dense::DENSE_ABOVE`, with cuBLAS only.
    Auto,
    /// Always the sparse gathers.
    Never,
    /// Always the dense GEMMs (CPU: the aux codes too, as a block over their candidates).
    Always,
}

/// Input normalisation applied by the data pipeline to training and held-out rows alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Raw activations.
    None,
    /// One scale s for the whole data set so that E||s x||^2 = d_in (SAELens'
    /// expected_average_only_in); folded into exported weights.
    Global,
    /// Per token: x -> (x - mean(x)) / ||x - mean(x)||_2 (the MC/FC paper, section 5); a row whose
    /// centred norm is 0 stays 0. Exported as SAELens `layer_norm` with sqrt(d_in - 1) folded in.
    #[value(alias = "per_token")]
    #[serde(alias = "per-token")]
    PerToken,
}

impl Normalize {
    /// The value as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Normalize::None => "none",
            Normalize::Global => "global",
            Normalize::PerToken => "per-token",
        }
    }
}

/// `normalize` in a config file: a mode in either spelling, or the bool older configs have
/// (true = global, false = none).
fn bool_or_normalize<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Normalize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Name(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(true) => Ok(Normalize::Global),
        Raw::Bool(false) => Ok(Normalize::None),
        Raw::Name(s) => Normalize::from_str(&s, false).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid normalize '{s}': expected none, global or per_token (or true / false, as older configs have it)"
            ))
        }),
    }
}

/// How the CUDA backend computes the encoder pre-activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// cuBLAS/cuBLASLt product (`--precision` f32, tf32 or bf16), then a bias + ReLU pass.
    Cublas,
    /// The hand-written f32 tiled GEMM whose epilogue applies bias, ReLU and the JumpReLU
    /// threshold and builds batchtopk's first radix histogram (no second pass over B x F).
    Fused,
}

/// `aux` in a config file: one value (`aux = "aux_k"`, as older configs have it) or a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<AuxKind>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(AuxKind),
        Many(Vec<AuxKind>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    }))
}

/// Every training option. Field names are the config-file keys; flags are the same names in
/// kebab case (`--d-sae`, `--lr`, ...).
#[derive(Clone, Debug, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ---- model ----
    /// Selection rule.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().sparsifier)]
    pub sparsifier: SparsifierKind,
    /// Number of latents (d_sae).
    #[arg(long, default_value_t = TrainConfig::default().d_sae)]
    pub d_sae: usize,
    /// Input width; taken from the data when not given (must match it when given).
    #[arg(long)]
    pub d_in: Option<usize>,
    /// Active latents per token (topk, batchtopk, mutual_choice; Zipf budget total for wta).
    #[arg(long, default_value_t = TrainConfig::default().k)]
    pub k: usize,
    /// WTA sparsity rate: each latent keeps m = max(1, floor(B*rate)) tokens. Default k/d_sae.
    #[arg(long, allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// Feature-choice budget rule.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().budget)]
    pub budget: BudgetKind,
    /// Rounding of Zipf budgets: systematic (exactly B*k per batch, no latent starved) or the
    /// paper's literal floor.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().zipf_rounding)]
    pub zipf_rounding: ZipfRounding,
    #[arg(long, default_value_t = TrainConfig::default().zipf_alpha)]
    pub zipf_alpha: f64,
    #[arg(long, default_value_t = TrainConfig::default().zipf_beta)]
    pub zipf_beta: f64,
    /// Take --zipf-alpha and --zipf-beta from a Zipf fit of this run's feature densities (its
    /// eval/eval.json, else by evaluating it); the values used are saved in config.json.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["zipf_alpha", "zipf_beta"])]
    pub zipf_from: Option<PathBuf>,
    /// Largest per-latent budget under Zipf budgets (default: the batch size).
    #[arg(long)]
    pub m_max: Option<usize>,
    /// wta: for this many steps after the thresholds' first measurement, only entries above their
    /// latent's threshold compete for the budgets (the WTA paper's initial phase; 0: off).
    #[arg(long, default_value_t = TrainConfig::default().wta_theta_steps)]
    pub wta_theta_steps: u64,
    /// Hybrid: at most this many WTA survivors per token (default 2k).
    #[arg(long)]
    pub k_max: Option<usize>,
    /// ReLU sparsifier: L1 coefficient (penalty lambda * sum_i z_i ||W_dec_i||, mean over tokens).
    #[arg(long, default_value_t = TrainConfig::default().l1_coeff)]
    pub l1_coeff: f64,
    /// ReLU sparsifier: the L1 coefficient rises linearly from 0 over this many steps.
    #[arg(long, default_value_t = TrainConfig::default().l1_warmup_steps)]
    pub l1_warmup_steps: u64,
    /// Decoder rows at unit norm (projection + renormalisation) or free.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().decoder_norm)]
    pub decoder_norm: DecoderNorm,
    /// Aligned training: constrain W_enc_i . W_dec_i = 1.
    #[arg(long, default_value_t = false)]
    pub aligned: bool,
    /// Compute decode and backward as dense GEMMs when the codes are dense (auto: chosen per step
    /// from the number of kept entries; relu at initialisation keeps half of B x F). CUDA: the
    /// main codes, and auto only with cuBLAS.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().dense_codes)]
    pub dense_codes: DenseCodes,
    /// Start from the weights of this finished run (W_enc, b_enc, W_dec, b_dec and its running
    /// densities) with a fresh optimiser, schedule and thresholds; the sparsifier may differ
    /// (the MC/FC paper's MC -> FC recipe). d_in, d_sae and --aligned must match.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Decoder bias initialisation from the first batch.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().b_dec_init)]
    pub b_dec_init: BDecInit,

    // ---- auxiliary loss ----
    /// Auxiliary losses, one or a list (`--aux aux-k,aux-zipf`; summed). Default: aux_k for
    /// topk and batchtopk, aux_k + aux_zipf for mutual_choice, none for wta, hybrid and relu.
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1..)]
    #[serde(deserialize_with = "one_or_many")]
    pub aux: Option<Vec<AuxKind>>,
    /// Latents used by the aux loss per token (default d_in/2).
    #[arg(long)]
    pub k_aux: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().aux_alpha)]
    pub aux_alpha: f64,
    /// Tokens without firing after which a latent is dead (default min(10M, total tokens / 10)).
    #[arg(long)]
    pub dead_window: Option<u64>,

    // ---- thresholds ----
    #[arg(long, value_enum, default_value_t = TrainConfig::default().threshold_mode)]
    pub threshold_mode: ThresholdMode,
    /// Step from which the inference threshold EMA runs (default min(1000, steps/10)).
    #[arg(long)]
    pub threshold_start: Option<u64>,
    /// Calibrate the exported thresholds at the end of training, so that the exported L0
    /// matches the training rule's (global for batchtopk / mutual_choice, per latent for wta /
    /// hybrid): on the rows the training stream gives next (`training`, as many as
    /// --eval-tokens, at least a batch; the stream's position is unchanged), or on the held-out
    /// rows the summary reports on (`held-out`: in-sample); `auto`: `training` while those rows
    /// are new to the SAE (synthetic data, shards in their first pass), else `held-out`;
    /// `none` keeps the plain EMA of batch minima.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().threshold_calibration)]
    pub threshold_calibration: Calibration,
    /// EMA decay of the inference threshold (default 0.999; shorter runs use 1 - 10/steps
    /// after threshold_start, at least 0.9, so early minima do not linger in theta).
    #[arg(long)]
    pub threshold_decay: Option<f64>,

    // ---- optimisation ----
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Training steps (one batch each). Overridden by --tokens.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    pub steps: u64,
    /// Total training tokens; sets steps = tokens / batch_size.
    #[arg(long)]
    pub tokens: Option<u64>,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    /// Linear warm-up steps (default min(1000, steps/10)).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Fraction of steps at the end over which the learning rate decays linearly to 0.
    #[arg(long, default_value_t = TrainConfig::default().decay_frac)]
    pub decay_frac: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_beta1)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_beta2)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_eps)]
    pub adam_eps: f64,
    /// AdamW's decoupled weight decay (torch.optim.AdamW): W <- W (1 - lr * wd) before the Adam
    /// update, on W_enc (A under --aligned) and W_dec only, never the biases. 0: plain Adam.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Scale the whole gradient (every parameter, after the decoder projection) so that its
    /// global L2 norm is at most this, before Adam (torch.nn.utils.clip_grad_norm_). 0: off.
    #[arg(long, default_value_t = TrainConfig::default().grad_clip)]
    pub grad_clip: f64,
    /// Decay of the per-latent running density (used by Zipf budgets and aux_zipf).
    #[arg(long, default_value_t = TrainConfig::default().density_decay)]
    pub density_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,

    // ---- data ----
    /// Activation shards (file, directory or glob). Default: the built-in synthetic data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tensor name inside safetensors shards.
    #[arg(long)]
    pub tensor: Option<String>,
    /// Token-level shuffle buffer (rows; 0 or 1: rows in shard order within each chunk).
    #[arg(long, default_value_t = TrainConfig::default().shuffle_buffer)]
    pub shuffle_buffer: usize,
    /// Held-out tokens for evaluation (never trained on).
    #[arg(long, default_value_t = TrainConfig::default().eval_tokens)]
    pub eval_tokens: usize,
    /// The held-out split's layout, recorded in `config.json` (not a flag): `Some(true)` (every
    /// run since 2026-12-07) holds out whole token windows where the data's manifest gives its
    /// `rows_per_window`, so that no window is split between training and held-out rows and the
    /// CE evaluation has held-out windows at any context length; `None` (configs from before)
    /// keeps the earlier blocks of 256 rows, so that their split does not move (a config file
    /// may set `false` for a new run to get that layout).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_windows: Option<bool>,
    /// Input normalisation: none, global (one scale so that E||x||^2 = d_in, SAELens'
    /// expected_average_only_in) or per-token ((x - mean) / ||x - mean|| per row, the MC/FC
    /// paper's). `--normalize` alone means global, as it did when it was a switch.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "global",
          default_value_t = TrainConfig::default().normalize)]
    #[serde(deserialize_with = "bool_or_normalize")]
    pub normalize: Normalize,
    /// Exclude rows whose norm exceeds this multiple of the median norm (0 disables).
    #[arg(long, default_value_t = TrainConfig::default().max_norm_multiple)]
    pub max_norm_multiple: f64,
    /// Batches prefetched on the reader thread.
    #[arg(long, default_value_t = TrainConfig::default().prefetch)]
    pub prefetch: usize,
    /// Synthetic data: number of ground-truth features.
    #[arg(long, default_value_t = TrainConfig::default().synth_features)]
    pub synth_features: usize,
    /// Synthetic data: input width when --d-in is not given.
    #[arg(long, default_value_t = TrainConfig::default().synth_d_in)]
    pub synth_d_in: usize,
    /// Synthetic data: expected active features per token.
    #[arg(long, default_value_t = TrainConfig::default().synth_active)]
    pub synth_active: f64,
    /// Synthetic data: Zipf exponent of feature frequencies.
    #[arg(long, default_value_t = TrainConfig::default().synth_zipf)]
    pub synth_zipf: f64,
    /// Synthetic data: standard deviation of the Gaussian noise per coordinate.
    #[arg(long, default_value_t = TrainConfig::default().synth_noise)]
    pub synth_noise: f64,

    // ---- run ----
    /// Output directory of the run.
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Log a metrics line every this many steps.
    #[arg(long, default_value_t = TrainConfig::default().log_every)]
    pub log_every: u64,
    /// Held-out evaluation every this many steps (0: only at the end).
    #[arg(long, default_value_t = TrainConfig::default().eval_every)]
    pub eval_every: u64,
    /// Save a resumable checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = TrainConfig::default().checkpoint_every)]
    pub checkpoint_every: u64,
    /// Keep the SAE every this many steps (and at the end) in checkpoints/step_NNNNNN/, never
    /// overwritten (0: off). See docs/train.md, "Training history".
    #[arg(long, default_value_t = TrainConfig::default().keep_checkpoints)]
    pub keep_checkpoints: u64,
    /// Weight and density summaries into history.jsonl every this many steps (default: every
    /// logging step; 0: off).
    #[arg(long)]
    pub history_every: Option<u64>,
    #[arg(long, value_enum, default_value_t = TrainConfig::default().backend)]
    pub backend: BackendChoice,
    /// Encoder-product precision on CUDA.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().precision)]
    pub precision: Precision,
    /// Encoder kernel on CUDA (`fused` is also what runs when cuBLAS cannot be loaded).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().encoder)]
    pub encoder: EncoderKind,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar (metrics are still written).
    #[arg(long, default_value_t = false)]
    pub quiet: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            sparsifier: SparsifierKind::Wta,
            d_sae: 1024,
            d_in: None,
            k: 8,
            rate: None,
            budget: BudgetKind::Uniform,
            zipf_rounding: ZipfRounding::Systematic,
            zipf_alpha: 1.0,
            zipf_beta: 6.8,
            zipf_from: None,
            m_max: None,
            wta_theta_steps: 0,
            k_max: None,
            l1_coeff: 0.05,
            l1_warmup_steps: 0,
            decoder_norm: DecoderNorm::Unit,
            aligned: false,
            dense_codes: DenseCodes::Auto,
            init_from: None,
            b_dec_init: BDecInit::Mean,
            aux: None,
            k_aux: None,
            aux_alpha: 1.0 / 32.0,
            dead_window: None,
            threshold_mode: ThresholdMode::PerLatent,
            threshold_start: None,
            threshold_calibration: Calibration::Auto,
            threshold_decay: None,
            batch_size: 1024,
            steps: 3000,
            tokens: None,
            lr: 1e-3,
            warmup_steps: None,
            decay_frac: 0.2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 0.0,
            density_decay: 0.99,
            seed: 0,
            data: None,
            tensor: None,
            shuffle_buffer: 65_536,
            eval_tokens: 8192,
            held_out_windows: None,
            normalize: Normalize::None,
            max_norm_multiple: 10.0,
            prefetch: 4,
            synth_features: 512,
            synth_d_in: 128,
            synth_active: 6.0,
            synth_zipf: 1.0,
            synth_noise: 0.01,
            out: PathBuf::from("runs/default"),
            log_every: 50,
            eval_every: 500,
            checkpoint_every: 1000,
            keep_checkpoints: 0,
            history_every: None,
            backend: BackendChoice::Auto,
            precision: Precision::F32,
            encoder: EncoderKind::Cublas,
            threads: None,
            quiet: false,
        }
    }
}

/// A data path as the config records it: absolute (against the working directory), so that a
/// resume, an eval or a sweep started from another directory finds the same data. `memory:NAME`
/// (the Python package's in-memory data) is left as it is.
pub fn absolute_data(p: &Path) -> PathBuf {
    if crate::data::memory::name_of(p).is_some() {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether two recorded data paths (config-file values) name the same data: equal, or resolving
/// to the same file or directory (a run recorded `acts` relative, the resume gives `/x/acts`).
pub fn same_data_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    if a == b {
        return true;
    }
    match (a.as_str(), b.as_str()) {
        (Some(a), Some(b)) => {
            matches!((Path::new(a).canonicalize(), Path::new(b).canonicalize()), (Ok(x), Ok(y)) if x == y)
        }
        _ => false,
    }
}

impl TrainConfig {
    /// Merge defaults, an optional config file and the flags actually given on the command line
    /// (the data path made absolute: [`absolute_data`]).
    pub fn resolve(cli: &TrainConfig, matches: &ArgMatches, file: Option<&Path>) -> Result<Self> {
        let mut cfg = Self::merge(cli, matches, file)?;
        cfg.data = cfg.data.as_deref().map(absolute_data);
        Ok(cfg)
    }

    fn merge(cli: &TrainConfig, matches: &ArgMatches, file: Option<&Path>) -> Result<Self> {
        let Some(path) = file else { return Ok(cli.clone()) };
        let mut base = serde_json::to_value(Self::load(path)?)?;
        let given = serde_json::to_value(cli)?;
        for id in matches.ids() {
            let id = id.as_str();
            if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                if let Some(v) = given.get(id) {
                    base[id] = v.clone();
                }
            }
        }
        Ok(serde_json::from_value(base)?)
    }

    /// The options given on the command line, as config-file keys and values.
    pub fn given(cli: &TrainConfig, matches: &ArgMatches) -> Result<serde_json::Map<String, serde_json::Value>> {
        let all = serde_json::to_value(cli)?;
        let mut out = serde_json::Map::new();
        for id in matches.ids() {
            let id = id.as_str();
            if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                if let Some(v) = all.get(id) {
                    let v = match (id, v.as_str()) {
                        ("data", Some(p)) => serde_json::Value::from(absolute_data(Path::new(p)).to_string_lossy()),
                        _ => v.clone(),
                    };
                    out.insert(id.to_string(), v);
                }
            }
        }
        Ok(out)
    }

    /// Read a config file (`.toml` or `.json`); unknown keys are an error that names them.
    pub fn load(path: &Path) -> Result<Self> {
        // A FIFO or a device would block the read or never end it.
        if let Ok(m) = std::fs::metadata(path) {
            if !m.is_file() {
                bail!("config file {}: not a regular file", path.display());
            }
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e == "json");
        if is_json {
            crate::util::json::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
        } else {
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
        }
    }

    pub fn total_steps(&self) -> u64 {
        match self.tokens {
            Some(t) => (t / self.batch_size.max(1) as u64).max(1),
            None => self.steps,
        }
    }
    /// The built-in synthetic data these options describe (used when `data` is None).
    pub fn synth_spec(&self) -> crate::data::synthetic::SynthSpec {
        crate::data::synthetic::SynthSpec {
            d_in: self.d_in.unwrap_or(self.synth_d_in),
            n_features: self.synth_features,
            mean_active: self.synth_active,
            zipf: self.synth_zipf,
            noise: self.synth_noise,
            seed: self.seed,
        }
    }
    pub fn warmup(&self) -> u64 {
        self.warmup_steps.unwrap_or_else(|| 1000.min(self.total_steps() / 10))
    }
    /// The threshold EMA decay in force: given, else 0.999 for runs with >= 10k steps of EMA
    /// and 1 - 10/remaining (>= 0.9) for shorter ones.
    pub fn threshold_decay_value(&self) -> f64 {
        self.threshold_decay.unwrap_or_else(|| {
            let remaining = self.total_steps().saturating_sub(self.threshold_start_step()).max(1);
            (1.0 - 10.0 / remaining as f64).clamp(0.9, 0.999)
        })
    }
    pub fn threshold_start_step(&self) -> u64 {
        self.threshold_start.unwrap_or_else(|| 1000.min(self.total_steps() / 10))
    }
    /// WTA rate: given, or k/d_sae so that the expected L0 equals k.
    pub fn wta_rate(&self) -> f64 {
        self.rate.unwrap_or(self.k as f64 / self.d_sae as f64)
    }
    /// Uniform WTA budget per latent for a batch of `b` tokens.
    pub fn wta_m(&self, b: usize) -> usize {
        ((b as f64 * self.wta_rate()).floor() as usize).max(1)
    }
    pub fn hybrid_k_max(&self) -> usize {
        self.k_max.unwrap_or(2 * self.k)
    }
    /// The aux losses in force (none listed: no aux loss), without repeats.
    pub fn aux_kinds(&self) -> Vec<AuxKind> {
        let given: Vec<AuxKind> = match &self.aux {
            Some(v) => v.clone(),
            None => self.sparsifier.default_aux().to_vec(),
        };
        let mut out: Vec<AuxKind> = vec![];
        for a in given {
            if a != AuxKind::None && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
    /// relu's L1 coefficient per token at step `step` (0-based), with its linear warm-up.
    pub fn l1_lambda(&self, step: u64, rows: usize) -> f32 {
        let warm =
            if self.l1_warmup_steps > 0 { ((step + 1) as f64 / self.l1_warmup_steps as f64).min(1.0) } else { 1.0 };
        (self.l1_coeff * warm) as f32 / rows as f32
    }
    pub fn k_aux_for(&self, d_in: usize) -> usize {
        self.k_aux.unwrap_or((d_in / 2).max(1))
    }
    pub fn dead_window_tokens(&self) -> u64 {
        self.dead_window.unwrap_or_else(|| {
            let total = self.total_steps() * self.batch_size as u64;
            10_000_000u64.min(total / 10).max(self.batch_size as u64)
        })
    }
    pub fn m_max_for(&self, b: usize) -> usize {
        self.m_max.unwrap_or(b).min(b).max(1)
    }

    /// Check every setting before any work starts; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if self.d_sae < 1 {
            bail!("invalid --d-sae {}: the dictionary needs at least one latent", self.d_sae);
        }
        if self.batch_size == 0 {
            bail!("invalid --batch-size 0: a batch needs at least one token");
        }
        if let Some(0) = self.d_in {
            bail!("invalid --d-in 0: inputs need at least one dimension");
        }
        let uses_k = self.sparsifier.uses_k() || self.per_column_zipf();
        if uses_k && self.k == 0 {
            bail!("invalid --k 0: {} keeps k > 0 latents per token", self.sparsifier.name());
        }
        if uses_k && self.k > self.d_sae {
            bail!("invalid --k {}: larger than --d-sae {}", self.k, self.d_sae);
        }
        if self.sparsifier.per_column() {
            let rate = self.wta_rate();
            if !(rate > 0.0 && rate <= 1.0) {
                match self.rate {
                    Some(_) => bail!("invalid --rate {rate}: the WTA rate must be in (0, 1]"),
                    None => bail!(
                        "invalid --k {} for {}: without --rate the WTA rate is k / d_sae = {} / {} = {rate}, which must be in (0, 1]",
                        self.k,
                        self.sparsifier.name(),
                        self.k,
                        self.d_sae
                    ),
                }
            }
        }
        if self.sparsifier == SparsifierKind::Hybrid && self.hybrid_k_max() == 0 {
            bail!("invalid --k-max 0: hybrid keeps at least one latent per token");
        }
        if !self.sparsifier.trainable() {
            bail!("invalid --sparsifier jumprelu: jumprelu is the inference form of the batch-dependent sparsifiers, not a training rule (train batchtopk, mutual_choice or wta; the checkpoint loads as JumpReLU)");
        }
        if self.total_steps() == 0 {
            bail!("invalid --steps 0: training needs at least one step");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("invalid --lr {}: must be positive", self.lr);
        }
        if !(0.0..=1.0).contains(&self.decay_frac) {
            bail!("invalid --decay-frac {}: must be in [0, 1]", self.decay_frac);
        }
        for (name, v) in [("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("invalid {name} {v}: must be in [0, 1)");
            }
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("invalid --weight-decay {}: must be >= 0 (0: plain Adam)", self.weight_decay);
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            bail!("invalid --grad-clip {}: must be >= 0 (0: no clipping)", self.grad_clip);
        }
        let td = self.threshold_decay_value();
        if !(0.0..1.0).contains(&td) {
            bail!("invalid --threshold-decay {td}: must be in [0, 1)");
        }
        if !(self.density_decay >= 0.0 && self.density_decay < 1.0) {
            bail!("invalid --density-decay {}: must be in [0, 1)", self.density_decay);
        }
        // `!(x >= 0)` so that NaN is refused too (every comparison with NaN is false).
        for (name, v) in [
            ("--l1-coeff", self.l1_coeff),
            ("--aux-alpha", self.aux_alpha),
            ("--max-norm-multiple", self.max_norm_multiple),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("invalid {name} {v}: must be a finite number >= 0");
            }
        }
        if self.m_max == Some(0) {
            bail!("invalid --m-max 0: the largest per-latent budget must be >= 1");
        }
        if let Some(0) = self.k_aux {
            bail!("invalid --k-aux 0: the aux loss needs at least one latent per token");
        }
        if !(self.zipf_alpha > 0.0
            && self.zipf_alpha.is_finite()
            && self.zipf_beta >= 0.0
            && self.zipf_beta.is_finite())
        {
            bail!("invalid --zipf-alpha/--zipf-beta: alpha must be > 0 and beta >= 0");
        }
        if let (Normalize::PerToken, Some(d)) =
            (self.normalize, self.d_in.or(self.data.is_none().then_some(self.synth_d_in)))
        {
            if d < 2 {
                bail!("invalid --normalize per-token with d_in {d}: a centred row of width 1 is always 0");
            }
        }
        if self.data.is_none() {
            self.synth_spec().check("--synth-")?;
            if let Some(d) = self.d_in {
                if d != self.synth_d_in {
                    bail!("invalid --d-in {d}: the synthetic data has width --synth-d-in {}", self.synth_d_in);
                }
            }
        }
        if self.log_every == 0 {
            bail!("invalid --log-every 0: must be >= 1");
        }
        Ok(())
    }

    fn per_column_zipf(&self) -> bool {
        self.sparsifier.per_column() && self.budget == BudgetKind::Zipf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_rate_error_names_the_flags_given() {
        let cfg = TrainConfig { k: 300, d_sae: 256, ..TrainConfig::default() };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("--k 300") && e.contains("k / d_sae"), "{e}");
        let cfg = TrainConfig { rate: Some(2.0), ..TrainConfig::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("invalid --rate 2"));
    }
}
