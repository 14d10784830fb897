//! SAE parameters and the full training state, in the SPEC's layout (row-major, `W_enc` F x d).
//!
//! Parameters live in one contiguous buffer (as llm.c does) so that the optimiser, the GPU
//! upload and checkpointing each see one slice: `[W_enc (F*d) | b_enc (F) | W_dec (F*d) | b_dec (d)]`.

pub mod aligned;
pub mod init;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub d_in: usize,
    pub d_sae: usize,
}

impl Shape {
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        Self { d_in, d_sae }
    }
    pub fn len(&self) -> usize {
        2 * self.d_sae * self.d_in + self.d_sae + self.d_in
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Offsets of `[w_enc, b_enc, w_dec, b_dec, end]` in the flat buffer.
    pub fn offsets(&self) -> [usize; 5] {
        let fd = self.d_sae * self.d_in;
        let a = fd;
        let b = a + self.d_sae;
        let c = b + fd;
        [0, a, b, c, c + self.d_in]
    }
}

/// One flat f32 buffer holding the four parameter tensors (or their gradients / Adam moments).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub shape: Shape,
    pub data: Vec<f32>,
}

/// Mutable views of the four tensors of a [`Params`] buffer.
pub struct ParamsMut<'a> {
    pub w_enc: &'a mut [f32],
    pub b_enc: &'a mut [f32],
    pub w_dec: &'a mut [f32],
    pub b_dec: &'a mut [f32],
}

/// Shared views of the four tensors.
#[derive(Clone, Copy)]
pub struct ParamsRef<'a> {
    pub shape: Shape,
    pub w_enc: &'a [f32],
    pub b_enc: &'a [f32],
    pub w_dec: &'a [f32],
    pub b_dec: &'a [f32],
}

impl Params {
    pub fn zeros(shape: Shape) -> Self {
        Self { shape, data: crate::util::hugepage::zeroed_f32(shape.len()) }
    }
    pub fn from_parts(shape: Shape, w_enc: &[f32], b_enc: &[f32], w_dec: &[f32], b_dec: &[f32]) -> Self {
        let mut p = Self::zeros(shape);
        let m = p.parts_mut();
        m.w_enc.copy_from_slice(w_enc);
        m.b_enc.copy_from_slice(b_enc);
        m.w_dec.copy_from_slice(w_dec);
        m.b_dec.copy_from_slice(b_dec);
        p
    }
    pub fn parts(&self) -> ParamsRef<'_> {
        let [_, a, b, c, _] = self.shape.offsets();
        let (w_enc, rest) = self.data.split_at(a);
        let (b_enc, rest) = rest.split_at(b - a);
        let (w_dec, b_dec) = rest.split_at(c - b);
        ParamsRef { shape: self.shape, w_enc, b_enc, w_dec, b_dec }
    }
    pub fn parts_mut(&mut self) -> ParamsMut<'_> {
        let [_, a, b, c, _] = self.shape.offsets();
        let (w_enc, rest) = self.data.split_at_mut(a);
        let (b_enc, rest) = rest.split_at_mut(b - a);
        let (w_dec, b_dec) = rest.split_at_mut(c - b);
        ParamsMut { w_enc, b_enc, w_dec, b_dec }
    }
    pub fn w_enc(&self) -> &[f32] {
        self.parts().w_enc
    }
    pub fn b_enc(&self) -> &[f32] {
        self.parts().b_enc
    }
    pub fn w_dec(&self) -> &[f32] {
        self.parts().w_dec
    }
    pub fn b_dec(&self) -> &[f32] {
        self.parts().b_dec
    }
}

/// Everything a training run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Trainable parameters. With aligned training `w_enc` holds A (SPEC "Aligned training").
    pub params: Params,
    pub adam_m: Params,
    pub adam_v: Params,
    /// Completed optimiser steps.
    pub step: u64,
    /// Inference threshold per latent (the scalar repeated when global).
    pub theta: Vec<f32>,
    /// Whether theta[i] has received its first measurement.
    pub theta_set: Vec<bool>,
    /// Tokens since latent i last fired (dead-latent tracking for aux_k).
    pub since_fired: Vec<u64>,
    /// Running firing density per latent (EMA of the per-batch firing fraction).
    pub density: Vec<f32>,
}

impl TrainState {
    pub fn new(params: Params) -> Self {
        let shape = params.shape;
        let f = shape.d_sae;
        Self {
            adam_m: Params::zeros(shape),
            adam_v: Params::zeros(shape),
            params,
            step: 0,
            theta: vec![0.0; f],
            theta_set: vec![false; f],
            since_fired: vec![0; f],
            density: vec![0.0; f],
        }
    }
    pub fn shape(&self) -> Shape {
        self.params.shape
    }
}
