//! HQQ with one group for the whole tensor ([`Granularity::Tensor`](crate::recipe::Granularity)),
//! solved over passes of a tensor read in pieces, so a worker never holds the tensor.
//!
//! Every step of [`super::hqq_group`] is a reduction over the group: the min/max scan, the
//! RTN candidate's squared error, each half-quadratic iteration (`sum (q - y + E)` and
//! `sum |e|`) and each least-squares round (`sum (x - dq)^2` and the refit's four sums).
//! [`StreamedHqq`] runs them as passes ([`StreamedHqq::feed`] the weights in order, any
//! number at a time, then [`StreamedHqq::end_pass`]), one pass per step, and ends with the
//! group's stored `(scale, zero)` ([`TensorGroup`]); the codes are then computed piece by
//! piece ([`TensorGroup::encode`]).
//!
//! The sums are taken exactly as [`super::sums`] takes them over the whole group: `f32` lanes
//! over fixed blocks of [`BLOCK`] weights counted from the first, each block added in f64 in
//! block order (a partial block is carried over to the next piece). So the result is bit for
//! bit that of [`super::hqq_codes`] on the whole tensor, whatever the pieces.

use rayon::prelude::*;

use super::{
    code, fast_pow, hqq_pass, lane_sums, scan, score_fn, HqqConfig, Solver, Storage, BLOCK, SOLVER,
};
use crate::quantize::{AffineCodes, RtnAsym};

/// The stored form of a tensor-wide group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TensorGroup {
    /// The HQQ (or refitted) `(scale, zero)`: code `round(clamp(x / scale + zero))`.
    Hqq { scale: f32, zero: f32 },
    /// The asymmetric RTN of `[lo, hi]` (from 0), which scored better or was the fallback.
    Rtn { lo: f32, hi: f32 },
}

impl TensorGroup {
    /// The codes of a piece of the tensor and their dequantized values (written over
    /// `values`), laid out as one group (`row_len = group_len = values.len()`).
    pub fn encode(&self, cfg: &HqqConfig, values: &mut [f32]) -> AffineCodes {
        let qmax = ((1u32 << cfg.bits) - 1) as f32;
        let mut codes = vec![0u8; values.len()];
        let (scale, zero) = match *self {
            TensorGroup::Hqq { scale, zero } => {
                let inv = 1.0 / scale;
                write(values, &mut codes, |x| code(x * inv + zero, qmax));
                (scale, zero)
            }
            TensorGroup::Rtn { lo, hi } => {
                let rtn = RtnAsym::new(cfg.bits, Storage::of(cfg).rtn_grid(), lo, hi);
                write(values, &mut codes, |x| rtn.code(x));
                (rtn.scale, rtn.zero)
            }
        };
        values
            .par_iter_mut()
            .zip(codes.par_iter())
            .with_min_len(BLOCK)
            .for_each(|(v, &c)| *v = (f32::from(c) - zero) * scale);
        AffineCodes {
            bits: cfg.bits,
            row_len: values.len(),
            group_len: values.len(),
            codes,
            scales: vec![scale],
            zeros: vec![zero],
        }
    }
}

fn write(values: &[f32], codes: &mut [u8], code_of: impl Fn(f32) -> f32 + Sync) {
    values
        .par_iter()
        .zip(codes.par_iter_mut())
        .with_min_len(BLOCK)
        .for_each(|(&x, c)| *c = code_of(x) as u8);
}

/// The step the next pass computes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Min, max and NaN of the group.
    Scan,
    /// The RTN candidate's squared error.
    RtnError,
    /// One half-quadratic iteration at zero `z` (shrinkage `1 / beta`).
    Iterate {
        z: f32,
        beta: f32,
        done: usize,
    },
    /// One least-squares round scoring the stored pair `(s, z)`.
    Score {
        s: f32,
        z: f32,
        round: usize,
    },
    Done,
}

/// Per-tensor HQQ gathered over passes (see the module docs).
#[derive(Debug)]
pub struct StreamedHqq {
    cfg: HqqConfig,
    solver: Solver,
    step: Step,
    /// Weights fed in this pass (in the first: the group's size for the others).
    seen: u64,
    n: u64,
    /// Weights of the block being filled.
    pending: Vec<f32>,
    /// The pass's sums so far (up to five).
    totals: [f64; 5],
    lo: f32,
    hi: f32,
    has_nan: bool,
    rtn_sse: f64,
    /// Scale and inverse of the half-quadratic steps.
    inv: f32,
    scale: f32,
    best_err: f64,
    best_z: f32,
    best: Option<(f64, f32, f32)>,
    result: Option<TensorGroup>,
}

impl StreamedHqq {
    /// A solver for `cfg` (bits already checked by the recipe; refused here otherwise).
    pub fn new(cfg: HqqConfig) -> Result<StreamedHqq, crate::quantize::QuantizeError> {
        crate::quantize::check_bits(cfg.bits)?;
        Ok(StreamedHqq {
            cfg,
            solver: SOLVER,
            step: Step::Scan,
            seen: 0,
            n: 0,
            pending: Vec::with_capacity(BLOCK),
            totals: [0.0; 5],
            lo: f32::INFINITY,
            hi: f32::NEG_INFINITY,
            has_nan: false,
            rtn_sse: 0.0,
            inv: 0.0,
            scale: 0.0,
            best_err: f64::INFINITY,
            best_z: 0.0,
            best: None,
            result: None,
        })
    }

    /// True while another pass over the weights is needed.
    pub fn needs_pass(&self) -> bool {
        self.step != Step::Done
    }

    /// The group's stored form, once no pass is needed.
    pub fn result(&self) -> Option<TensorGroup> {
        self.result
    }

    /// Adds the next weights of the pass, in tensor order.
    pub fn feed(&mut self, values: &[f32]) {
        if self.step == Step::Done {
            return;
        }
        self.seen += values.len() as u64;
        if self.step == Step::Scan {
            let (lo, hi, nan) = scan(values);
            self.lo = self.lo.min(lo);
            self.hi = self.hi.max(hi);
            self.has_nan |= nan;
            return;
        }
        let mut rest = values;
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == BLOCK {
                let block = std::mem::take(&mut self.pending);
                self.add_blocks(&block);
                self.pending = block;
                self.pending.clear();
            }
        }
        let whole = rest.len() / BLOCK * BLOCK;
        self.add_blocks(&rest[..whole]);
        self.pending.extend_from_slice(&rest[whole..]);
    }

    /// Ends a pass: fixes what it measured and chooses the next step.
    pub fn end_pass(&mut self) {
        if !self.pending.is_empty() {
            let block = std::mem::take(&mut self.pending);
            self.add_blocks(&block);
            self.pending = block;
            self.pending.clear();
        }
        let totals = std::mem::take(&mut self.totals);
        let seen = std::mem::take(&mut self.seen);
        let qmax = self.qmax();
        let storage = Storage::of(&self.cfg);
        match self.step {
            Step::Scan => {
                self.n = seen;
                let range = self.hi - self.lo;
                let finite = range.is_finite() && self.lo.is_finite() && self.hi.is_finite();
                self.step = match self.has_nan || !finite {
                    // Also an empty group: the RTN of the range from 0.
                    true => self.finish(None),
                    false => Step::RtnError,
                };
            }
            Step::RtnError => {
                self.rtn_sse = totals[0];
                let range = self.hi - self.lo;
                self.step = if self.rtn_sse.is_finite() && range > 0.0 && self.n >= 2 {
                    self.scale = range / qmax;
                    self.inv = qmax / range;
                    let z = -self.lo * self.inv;
                    self.best_z = z;
                    self.iterate_or_score(z, self.solver.beta, 0)
                } else {
                    self.finish(None)
                };
            }
            Step::Iterate { z, beta, done } => {
                let err = totals[1] / self.n as f64;
                self.step = if err.is_nan() || err >= self.best_err {
                    self.start_scoring()
                } else {
                    (self.best_err, self.best_z) = (err, z);
                    let next = self.solver.next_zero(z, totals[0] / self.n as f64);
                    self.iterate_or_score(next, beta * self.solver.growth(), done + 1)
                };
            }
            Step::Score { s, z, round } => {
                let sse = totals[0];
                if sse < self.best.map_or(self.rtn_sse, |b| b.0) {
                    self.best = Some((sse, s, z));
                }
                let ls = [totals[1], totals[2], totals[3], totals[4]];
                let current = storage.refit(self.n as f64, ls, qmax);
                self.step = match current {
                    Some((s2, z2)) if (s2, z2) != (s, z) && round < self.solver.refit_rounds => {
                        Step::Score {
                            s: s2,
                            z: z2,
                            round: round + 1,
                        }
                    }
                    _ => self.finish(self.best.map(|(_, s, z)| (s, z))),
                };
            }
            Step::Done => {}
        }
    }

    fn qmax(&self) -> f32 {
        ((1u32 << self.cfg.bits) - 1) as f32
    }

    /// The next half-quadratic step, or the first least-squares round once `done` steps
    /// (see [`Solver::steps`]) have run.
    fn iterate_or_score(&mut self, z: f32, beta: f32, done: usize) -> Step {
        match done < self.solver.steps(self.cfg.iterations) {
            true => Step::Iterate { z, beta, done },
            false => self.start_scoring(),
        }
    }

    fn start_scoring(&mut self) -> Step {
        let storage = Storage::of(&self.cfg);
        let stored = storage.store(f64::from(self.scale), f64::from(self.best_z), self.qmax());
        match stored {
            Some((s, z)) => Step::Score { s, z, round: 0 },
            None => self.finish(None),
        }
    }

    fn finish(&mut self, hqq: Option<(f32, f32)>) -> Step {
        self.result = Some(match hqq {
            Some((scale, zero)) => TensorGroup::Hqq { scale, zero },
            None => TensorGroup::Rtn {
                lo: self.lo.min(0.0),
                hi: self.hi.max(0.0),
            },
        });
        self.pending = Vec::new();
        Step::Done
    }

    /// Adds whole blocks (and, at the end of a pass, the last partial one) to the totals.
    fn add_blocks(&mut self, values: &[f32]) {
        let qmax = self.qmax();
        let parts: Vec<[f64; 5]> = match self.step {
            Step::RtnError => {
                let rtn = RtnAsym::new(
                    self.cfg.bits,
                    Storage::of(&self.cfg).rtn_grid(),
                    self.lo.min(0.0),
                    self.hi.max(0.0),
                );
                blocks(values, |xv| {
                    let d = xv - rtn.dequantize(rtn.code(xv));
                    [d * d, 0.0, 0.0, 0.0, 0.0]
                })
            }
            Step::Iterate { z, beta, .. } => {
                let (inv, inv_beta) = (self.inv, 1.0 / beta);
                let p1 = self.solver.lp_norm - 1.0;
                let sqrt = self.solver.lp_norm == 0.5;
                values
                    .par_chunks(BLOCK)
                    .map(|b| {
                        let [u, e] = match sqrt {
                            true => hqq_pass(b, inv, z, qmax, |ae| inv_beta / ae.sqrt()),
                            false => hqq_pass(b, inv, z, qmax, |ae| fast_pow(ae, p1) * inv_beta),
                        };
                        [u, e, 0.0, 0.0, 0.0]
                    })
                    .collect()
            }
            Step::Score { s, z, .. } => blocks(values, score_fn(s, z, qmax)),
            Step::Scan | Step::Done => Vec::new(),
        };
        for part in parts {
            for (total, p) in self.totals.iter_mut().zip(part) {
                *total += p;
            }
        }
    }
}

/// [`lane_sums`] of `f` over each [`BLOCK`] of `values`, in block order.
fn blocks(values: &[f32], f: impl Fn(f32) -> [f32; 5] + Sync) -> Vec<[f64; 5]> {
    values
        .par_chunks(BLOCK)
        .map(|b| lane_sums(b, b, &|xv: f32, _| f(xv)))
        .collect()
}
