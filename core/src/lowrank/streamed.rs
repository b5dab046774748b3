//! The randomized range finder of [`super`] over a matrix read in row blocks, so that a
//! worker factors a tensor far larger than its memory: it holds `Q^T` (`l x m`), one or two
//! `l x n` matrices and one row block, never the matrix itself, and reads the matrix once
//! per product with it.
//!
//! The steps are those of [`super::svd_lowrank`], each product with `A` one pass over its
//! rows in order ([`StreamedLowRank::feed`] any number of whole rows at a time, then
//! [`StreamedLowRank::end_pass`]):
//!
//! 1. *Range:* `Y = A Omega` row block by row block (rows of `Y` are rows of `A` times
//!    `Omega`), and `||A||_F^2`; then `Q = orth(Y)`.
//! 2. *Power iterations* (`power_iters` times): `Z = Q^T A` accumulated over row blocks,
//!    `Z = orth(Z)`; then `Y = A Z^T` block by block, `Q = orth(Y)`.
//! 3. *Projection:* `B = Q^T A` accumulated over row blocks; the small eigenproblem and the
//!    factors exactly as in [`super`]. Under an energy target a sketch too narrow to reach it
//!    doubles and starts again from step 1.
//!
//! Determinism: rows are grouped into blocks of [`block_rows`] rows, a function of the
//! matrix's width only (never of how rows are fed, the chunk size or a memory limit); each
//! block's product is computed in f32 on fixed sub-blocks and added to an f64 accumulator in
//! block order. So the factors are bit for bit the same however the rows arrive.

use rayon::prelude::*;

use super::{
    assemble, energy_rank, gaussian_rows, orthonormalize_rows, sgemm, storage_rank,
    symmetric_eigen, zero_factors, LowRank, LowRankError, RankRule, Sketch, View, ENERGY_SLACK,
    ENERGY_START_WIDTH, MAX_POWER_ITERS, OVERSAMPLE, PANEL,
};

/// Elements per row block (4 MiB of f32): large enough for efficient products, small next
/// to any memory limit a worker can run under.
pub const BLOCK_ELEMENTS: usize = 1 << 20;

/// Rows per block for a matrix of `cols` columns (at least one).
pub fn block_rows(cols: usize) -> usize {
    (BLOCK_ELEMENTS / cols.max(1)).max(1)
}

/// What the next pass over the matrix computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `Y = A Omega` (or `A Z^T` during a power iteration) into `Q^T`; the energy on the
    /// first pass.
    Range,
    /// `Z = Q^T A` for a power iteration.
    Right,
    /// `B = Q^T A`, then the factors.
    Project,
    /// The factors are ready.
    Done,
}

/// A truncated SVD gathered over passes of row blocks (see the module docs).
#[derive(Debug)]
pub struct StreamedLowRank {
    rows: usize,
    cols: usize,
    rule: RankRule,
    power_iters: usize,
    seed: u64,
    /// Rows per block ([`block_rows`]).
    block_rows: usize,
    /// The rank a non-energy rule fixes up front.
    fixed: Option<usize>,
    width: usize,
    phase: Phase,
    /// Power iterations done in this sketch.
    iterations_done: usize,
    /// `||A||_F^2`, per block in f64, summed in block order (complete after the first pass).
    total: f64,
    total_known: bool,
    /// Rows of the current pass seen so far (those in `pending` included).
    seen: usize,
    /// Rows of the block being filled.
    pending: Vec<f32>,
    /// The `l x n` matrix multiplied into the rows in a range pass: `Omega^T`, or `Z` in a
    /// power iteration.
    right_t: Vec<f32>,
    /// `Q^T`, `l x m`.
    qt: Vec<f32>,
    /// `Q^T A` in f64, `l x n`, accumulated over blocks.
    projected: Vec<f64>,
    result: Option<LowRank>,
}

impl StreamedLowRank {
    /// A factorization of a `rows x cols` matrix under `rule`, or why the rule is invalid.
    pub fn new(
        rows: usize,
        cols: usize,
        rule: RankRule,
        power_iters: usize,
        seed: u64,
    ) -> Result<StreamedLowRank, LowRankError> {
        if cols == 0 {
            return Err(LowRankError::ZeroRowLen);
        }
        super::check_rule(rule)?;
        let full = rows.min(cols);
        let fixed = match rule {
            RankRule::Rank(r) => Some(r.min(full)),
            RankRule::StorageFraction(f) => Some(storage_rank(rows, cols, f, full)),
            RankRule::Energy(_) => None,
        };
        let width = initial_width(fixed, full);
        let mut lr = StreamedLowRank {
            rows,
            cols,
            rule,
            power_iters: power_iters.min(MAX_POWER_ITERS),
            seed,
            block_rows: block_rows(cols),
            fixed,
            width,
            phase: Phase::Range,
            iterations_done: 0,
            total: 0.0,
            total_known: false,
            seen: 0,
            pending: Vec::new(),
            right_t: Vec::new(),
            qt: Vec::new(),
            projected: Vec::new(),
            result: None,
        };
        if full == 0 || fixed == Some(0) {
            lr.finish_with(zero_factors(rows, cols, fixed.unwrap_or(0)));
        } else {
            lr.start_sketch();
        }
        Ok(lr)
    }

    /// The same factorization over blocks of `rows` rows (tests: several blocks in a small
    /// matrix).
    #[cfg(test)]
    pub(crate) fn with_block_rows(mut self, rows: usize) -> Self {
        self.block_rows = rows.max(1);
        self
    }

    /// True while another pass over the matrix is needed.
    pub fn needs_pass(&self) -> bool {
        self.phase != Phase::Done
    }

    /// Adds whole rows (row-major, `cols` each) in matrix order to the current pass.
    pub fn feed(&mut self, values: &[f32]) -> Result<(), LowRankError> {
        if values.len() % self.cols != 0 {
            return Err(LowRankError::RaggedRows {
                len: values.len(),
                row_len: self.cols,
            });
        }
        if self.phase == Phase::Done {
            return Ok(());
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(LowRankError::NonFinite {
                index: self.seen * self.cols + i,
            });
        }
        let block = self.block_rows * self.cols;
        let mut rest = values;
        while !rest.is_empty() {
            let take = (block - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            self.seen += take / self.cols;
            rest = &rest[take..];
            if self.pending.len() == block {
                self.flush_block();
            }
        }
        Ok(())
    }

    /// Ends a pass over the matrix: fails if it did not see exactly `rows` rows.
    pub fn end_pass(&mut self) -> Result<(), LowRankError> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        if self.seen != self.rows {
            return Err(LowRankError::RaggedRows {
                len: self.seen * self.cols,
                row_len: self.cols,
            });
        }
        if !self.pending.is_empty() {
            self.flush_block();
        }
        self.seen = 0;
        self.total_known = true;
        match self.phase {
            Phase::Range => {
                if self.total == 0.0 {
                    self.finish_with(zero_factors(self.rows, self.cols, self.fixed.unwrap_or(0)));
                    return Ok(());
                }
                orthonormalize_rows(&mut self.qt, self.width, self.rows);
                self.phase = match self.iterations_done < self.power_iters {
                    true => Phase::Right,
                    false => Phase::Project,
                };
                self.projected = vec![0.0; self.width * self.cols];
            }
            Phase::Right => {
                let mut z: Vec<f32> = self.projected.iter().map(|&v| v as f32).collect();
                orthonormalize_rows(&mut z, self.width, self.cols);
                self.right_t = z;
                self.iterations_done += 1;
                self.phase = Phase::Range;
            }
            Phase::Project => self.project(),
            Phase::Done => {}
        }
        Ok(())
    }

    /// The factors, once [`Self::needs_pass`] is false.
    pub fn into_factors(self) -> Option<LowRank> {
        self.result
    }

    /// Bytes the state holds at most (for a memory estimate): `Q^T`, the `l x n` matrices
    /// and one block.
    pub fn held_bytes(rows: usize, cols: usize, width: usize) -> u64 {
        let (m, n, l) = (rows as u64, cols as u64, width as u64);
        let block = (block_rows(cols) * cols) as u64;
        // qt + factors' left (f32); right_t (f32), projected (f64), a block product (f32),
        // right in f64 and f32; the pending block and its copy.
        8 * l * m + 28 * l * n + 8 * block
    }

    /// The sketch width the factorization of a `rows x cols` matrix under `rule` reaches at
    /// most (an energy target may need every column).
    pub fn max_width(rows: usize, cols: usize, rule: RankRule) -> usize {
        let full = rows.min(cols);
        match rule {
            RankRule::Rank(r) => initial_width(Some(r.min(full)), full),
            RankRule::StorageFraction(f) => {
                initial_width(Some(storage_rank(rows, cols, f, full)), full)
            }
            RankRule::Energy(_) => full,
        }
    }

    fn finish_with(&mut self, factors: LowRank) {
        self.result = Some(factors);
        self.phase = Phase::Done;
        self.pending = Vec::new();
        self.right_t = Vec::new();
        self.qt = Vec::new();
        self.projected = Vec::new();
    }

    fn start_sketch(&mut self) {
        self.right_t = gaussian_rows(self.width, self.cols, self.seed);
        self.qt = vec![0.0; self.width * self.rows];
        self.iterations_done = 0;
        self.phase = Phase::Range;
    }

    /// Processes the rows in `pending` (a whole block, or the last rows of the matrix).
    fn flush_block(&mut self) {
        let n = self.cols;
        let block = std::mem::take(&mut self.pending);
        let rows = block.len() / n;
        let first_row = self.seen - rows;
        match self.phase {
            Phase::Range => {
                if !self.total_known {
                    self.total += block
                        .iter()
                        .map(|&x| f64::from(x) * f64::from(x))
                        .sum::<f64>();
                }
                let y = rows_times_t(&block, rows, n, &self.right_t, self.width);
                for (r, y_row) in y.chunks(self.width).enumerate() {
                    for (i, &v) in y_row.iter().enumerate() {
                        self.qt[i * self.rows + first_row + r] = v;
                    }
                }
            }
            Phase::Right | Phase::Project => {
                let l = self.width;
                let qt_block: Vec<f32> = (0..l)
                    .flat_map(|i| {
                        let at = i * self.rows + first_row;
                        self.qt[at..at + rows].iter().copied()
                    })
                    .collect();
                let product = transpose_times(&qt_block, l, &block, rows, n);
                for (acc, &v) in self.projected.iter_mut().zip(&product) {
                    *acc += f64::from(v);
                }
            }
            Phase::Done => {}
        }
        self.pending = block;
        self.pending.clear();
    }

    /// The end of a projection pass: the eigenproblem, the rank, and either the factors or
    /// a wider sketch.
    fn project(&mut self) {
        let (m, n, l) = (self.rows, self.cols, self.width);
        let b = std::mem::take(&mut self.projected);
        let mut g = super::symmetric_gram(&b, l, n);
        let (lambda, wt) = symmetric_eigen(&mut g, l);
        let full = m.min(n);
        let k = match (self.rule, self.fixed) {
            (_, Some(k)) => k,
            (RankRule::Energy(e), None) => {
                let found = energy_rank(&lambda, e * self.total, ENERGY_SLACK * self.total);
                match found {
                    Some(k) if k + OVERSAMPLE <= l || l == full => k,
                    None if l == full => l,
                    _ => {
                        self.width = (l * 2).min(full);
                        self.start_sketch();
                        return;
                    }
                }
            }
            // Non-energy rules fix the rank in `new`.
            (_, None) => l.min(full),
        };
        let sketch = Sketch {
            width: l,
            qt: std::mem::take(&mut self.qt),
            b,
            lambda,
            wt,
        };
        let factors = assemble(&sketch, m, n, k);
        self.finish_with(factors);
    }
}

fn initial_width(fixed: Option<usize>, full: usize) -> usize {
    match fixed {
        Some(k) => (k + OVERSAMPLE).min(full),
        None => ENERGY_START_WIDTH.min(full),
    }
}

/// `X R^T` for rows `X` (`rows x n`) and `R` (`l x n`): `rows x l`, row-major, computed in
/// parallel over fixed sub-blocks of [`PANEL`] rows.
fn rows_times_t(x: &[f32], rows: usize, n: usize, r: &[f32], l: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * l];
    out.par_chunks_mut(PANEL * l)
        .zip(x.par_chunks(PANEL * n))
        .for_each(|(o, xb)| {
            let sub = xb.len() / n;
            let xv = View {
                data: xb,
                rs: n,
                cs: 1,
            };
            let rtv = View {
                data: r,
                rs: 1,
                cs: n,
            };
            sgemm(sub, n, l, 1.0, xv, rtv, 0.0, o, l, 1);
        });
    out
}

/// `X A` for `X` (`l x rows`) and a block `A` (`rows x n`): `l x n`, row-major, computed in
/// parallel over fixed panels of [`PANEL`] output rows (each element one dot product over
/// the block's rows, so the split does not change it).
fn transpose_times(x: &[f32], l: usize, a: &[f32], rows: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; l * n];
    out.par_chunks_mut(PANEL * n)
        .zip(x.par_chunks(PANEL * rows))
        .for_each(|(o, xb)| {
            let sub = xb.len() / rows.max(1);
            let xv = View {
                data: xb,
                rs: rows,
                cs: 1,
            };
            let av = View {
                data: a,
                rs: n,
                cs: 1,
            };
            sgemm(sub, rows, n, 1.0, xv, av, 0.0, o, n, 1);
        });
    out
}

impl LowRank {
    /// Writes rows `first_row..` of `left * right` into `out` (whole rows of `cols`), in
    /// fixed panels of rows, so a row's values do not depend on which rows are asked with it.
    pub fn reconstruct_rows(&self, first_row: usize, out: &mut [f32]) -> Result<(), LowRankError> {
        let (n, k) = (self.cols, self.rank);
        let inconsistent = LowRankError::Inconsistent {
            rows: self.rows,
            cols: n,
            rank: k,
        };
        if n == 0 || out.len() % n != 0 {
            return Err(inconsistent);
        }
        let rows = out.len() / n;
        let end = first_row.saturating_add(rows);
        let consistent = end <= self.rows
            && Some(self.left.len()) == self.rows.checked_mul(k)
            && Some(self.right.len()) == k.checked_mul(n);
        if !consistent {
            return Err(inconsistent);
        }
        if k == 0 {
            out.fill(0.0);
            return Ok(());
        }
        let left = &self.left[first_row * k..end * k];
        out.par_chunks_mut(PANEL * n)
            .zip(left.par_chunks(PANEL * k))
            .for_each(|(o, lb)| {
                let sub = o.len() / n;
                let lv = View {
                    data: lb,
                    rs: k,
                    cs: 1,
                };
                let rv = View {
                    data: &self.right,
                    rs: n,
                    cs: 1,
                };
                sgemm(sub, k, n, 1.0, lv, rv, 0.0, o, n, 1);
            });
        Ok(())
    }
}
