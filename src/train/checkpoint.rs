//! Resumable trainer state: parameters, Adam moments, thresholds, dead-latent counters and the
//! data position, in one safetensors file written atomically (`trainer_state.safetensors`).

use crate::model::{Params, Shape, TrainState};
use crate::util::atomic::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

pub const STATE_FILE: &str = "trainer_state.safetensors";

/// What is saved beside the tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateMeta {
    pub step: u64,
    pub d_in: usize,
    pub d_sae: usize,
    /// Data source position after the last batch trained on.
    pub position: serde_json::Value,
    pub input_scale: f32,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// What the run trains, as its config said when this checkpoint was written
    /// ([`trained_config`]): a resume refuses a `config.json` edited since, or a trainer state
    /// from another run. Absent in checkpoints of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// The options of `cfg` that say what a run trains: all but those a resume may change
/// ([`super::rundir::SAFE_ON_RESUME`]), where its files go and how it prints, and the data's
/// path (checked by the sample of its rows instead, and free to move).
pub fn trained_config(cfg: &crate::config::TrainConfig) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(cfg)?;
    if let Some(o) = v.as_object_mut() {
        for k in super::rundir::SAFE_ON_RESUME.iter().chain(&["out", "quiet", "threads", "data"]) {
            o.remove(*k);
        }
    }
    Ok(v)
}

/// Refuse to resume `cfg` from a checkpoint whose recorded config differs: `config.json` was
/// edited after the checkpoint, or the trainer state is another run's. Names every difference.
/// `command` says who refuses ("--resume DIR", "sae export DIR"); `remedy` what else to do.
pub fn check_same_run(
    dir: &Path,
    cfg: &crate::config::TrainConfig,
    meta: &StateMeta,
    command: &str,
    remedy: &str,
) -> Result<()> {
    let Some(Value::Object(then)) = &meta.config else { return Ok(()) };
    let Value::Object(now) = trained_config(cfg)? else { return Ok(()) };
    let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    let mut keys: Vec<&String> = then.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| then.get(*k) != now.get(*k))
        .map(|k| format!("{k} {} (the checkpoint was trained with {})", show(now.get(k)), show(then.get(k))))
        .collect();
    ensure!(
        diff.is_empty(),
        "{command}: {} says {}, unlike {}: edited after the checkpoint, or a trainer state of another run; \
         put the values back{remedy}",
        dir.join(crate::train::CONFIG_FILE).display(),
        diff.join(", "),
        dir.join(STATE_FILE).display()
    );
    Ok(())
}

pub fn save(dir: &Path, state: &TrainState, meta: &StateMeta) -> Result<()> {
    let theta_set: Vec<u8> = state.theta_set.iter().map(|&b| b as u8).collect();
    let f = state.shape().d_sae;
    let n = state.params.data.len();
    let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![
        ("params", Dtype::F32, vec![n], bytemuck::cast_slice(&state.params.data)),
        ("adam_m", Dtype::F32, vec![n], bytemuck::cast_slice(&state.adam_m.data)),
        ("adam_v", Dtype::F32, vec![n], bytemuck::cast_slice(&state.adam_v.data)),
        ("theta", Dtype::F32, vec![f], bytemuck::cast_slice(&state.theta)),
        ("theta_set", Dtype::U8, vec![f], &theta_set),
        ("since_fired", Dtype::U64, vec![f], bytemuck::cast_slice(&state.since_fired)),
        ("density", Dtype::F32, vec![f], bytemuck::cast_slice(&state.density)),
    ];
    let views: Vec<(String, TensorView<'_>)> = tensors
        .into_iter()
        .map(|(name, dt, shape, bytes)| Ok((name.to_string(), TensorView::new(dt, shape, bytes)?)))
        .collect::<Result<_>>()?;
    let mut md = HashMap::new();
    md.insert("saetrain_state".to_string(), serde_json::to_string(meta)?);
    let bytes = safetensors::serialize(views, Some(md))?;
    write_atomic(&dir.join(STATE_FILE), &bytes)
}

pub fn load(dir: &Path) -> Result<(TrainState, StateMeta)> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let ctx = || format!("{}", path.display());
    let (_, header) = SafeTensors::read_metadata(&bytes).with_context(ctx)?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("saetrain_state"))
        .with_context(|| format!("{}: missing 'saetrain_state' metadata", path.display()))?;
    let meta: StateMeta = serde_json::from_str(meta_json)
        .with_context(|| format!("{}: bad 'saetrain_state' metadata", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(ctx)?;
    let shape = Shape::new(meta.d_in, meta.d_sae);
    let f = meta.d_sae;
    let get = |name: &str, dt: Dtype, len: usize| -> Result<Vec<u8>> {
        let t = st.tensor(name).with_context(|| format!("{}: missing tensor '{name}'", path.display()))?;
        ensure!(t.dtype() == dt, "{}: tensor '{name}' has dtype {:?}, expected {dt:?}", path.display(), t.dtype());
        let n: usize = t.shape().iter().product();
        ensure!(n == len, "{}: tensor '{name}' has {n} elements, expected {len}", path.display());
        Ok(t.data().to_vec())
    };
    let f32s = |name: &str, len: usize| -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&get(name, Dtype::F32, len)?))
    };
    let n = shape.len();
    let state = TrainState {
        params: Params { shape, data: f32s("params", n)? },
        adam_m: Params { shape, data: f32s("adam_m", n)? },
        adam_v: Params { shape, data: f32s("adam_v", n)? },
        step: meta.step,
        theta: f32s("theta", f)?,
        theta_set: get("theta_set", Dtype::U8, f)?.into_iter().map(|b| b != 0).collect(),
        since_fired: bytemuck::pod_collect_to_vec::<u8, u64>(&get("since_fired", Dtype::U64, f)?),
        density: f32s("density", f)?,
    };
    // A damaged file (a bad sector, a partial copy) would else resume and diverge, blamed on --lr.
    if let Some(what) = non_finite(&state) {
        bail!(
            "{}: {what}: the trainer state is damaged; resume from a kept checkpoint (checkpoints/) or train anew",
            path.display()
        );
    }
    Ok((state, meta))
}

/// "tensor 'adam_v' holds inf at index 3328" for the first value of the state that cannot be
/// (a non-finite parameter, moment or density, a negative second moment), else None. The
/// trainer checks before it writes a checkpoint (a learning rate so high that the second
/// moments overflow leaves the loss finite), and the loader again.
pub fn non_finite(state: &TrainState) -> Option<String> {
    let finite: [(&str, &[f32]); 4] = [
        ("params", &state.params.data),
        ("adam_m", &state.adam_m.data),
        ("adam_v", &state.adam_v.data),
        ("density", &state.density),
    ];
    finite.into_iter().find_map(|(name, v)| {
        let i = v.iter().position(|x| !x.is_finite() || (name == "adam_v" && *x < 0.0))?;
        Some(format!("tensor '{name}' holds {} at index {i}", v[i]))
    })
}
