//! Mapping between wire messages and core types, so that core never sees prost.

use shardpress_core::dtype::DType;
use shardpress_core::metrics::TensorMetrics;
use shardpress_core::plan::{BlockScales, PackedInts, PlannedTensor};

use crate::v1::{self, JobState, JobStatus, TensorResult, TensorSlice};

/// A wire message that does not decode to a valid core value.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("tensor {tensor:?}: unknown dtype {dtype:?}")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: bad FP8 scales: {reason}")]
    BadScales { tensor: String, reason: String },
    #[error("tensor {tensor:?}: data range {start}..{end} is reversed")]
    BadRange {
        tensor: String,
        start: u64,
        end: u64,
    },
}

impl From<&PlannedTensor> for TensorSlice {
    fn from(t: &PlannedTensor) -> Self {
        TensorSlice {
            name: t.name.clone(),
            source_file: t.source_file.clone(),
            dtype: t.dtype.as_safetensors().to_string(),
            shape: t.shape.clone(),
            data_start: t.data_start,
            data_end: t.data_end,
            share_candidate: None,
            scales: t.scales.as_ref().map(wire_scales),
            packed: t.packed.as_ref().map(|p| v1::PackedInts {
                bits: u32::from(p.bits),
                scales: Some(wire_scales(&p.scales)),
                zero_points: p.zero_points.as_ref().map(wire_scales),
            }),
            solved: String::new(),
        }
    }
}

fn wire_scales(s: &BlockScales) -> v1::BlockScales {
    v1::BlockScales {
        name: s.name.clone(),
        source_file: s.source_file.clone(),
        dtype: s.dtype.as_safetensors().to_string(),
        shape: s.shape.clone(),
        data_start: s.data_start,
        data_end: s.data_end,
        block: s.block.to_vec(),
    }
}

fn packed_ints(tensor: &str, p: &v1::PackedInts) -> Result<PackedInts, ConvertError> {
    let bad = |reason: String| ConvertError::BadScales {
        tensor: tensor.to_owned(),
        reason,
    };
    let bits = match p.bits {
        4 => 4,
        8 => 8,
        other => return Err(bad(format!("{other}-bit packed codes"))),
    };
    let scales = p
        .scales
        .as_ref()
        .ok_or_else(|| bad("packed codes without scales".into()))?;
    let zero_points = p
        .zero_points
        .as_ref()
        .map(|z| block_scales_of(tensor, z, |d| d == DType::I32))
        .transpose()?;
    Ok(PackedInts {
        bits,
        scales: block_scales(tensor, scales)?,
        zero_points,
    })
}

fn block_scales(tensor: &str, s: &v1::BlockScales) -> Result<BlockScales, ConvertError> {
    block_scales_of(tensor, s, DType::is_decodable_float)
}

fn block_scales_of(
    tensor: &str,
    s: &v1::BlockScales,
    allowed: impl Fn(DType) -> bool,
) -> Result<BlockScales, ConvertError> {
    let bad = |reason: String| ConvertError::BadScales {
        tensor: tensor.to_owned(),
        reason,
    };
    let dtype = DType::from_safetensors(&s.dtype)
        .filter(|d| allowed(*d))
        .ok_or_else(|| {
            bad(format!(
                "side tensor dtype {:?} is not allowed here",
                s.dtype
            ))
        })?;
    let block: [u64; 2] = s
        .block
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("block {:?} is not [rows, cols]", s.block)))?;
    let elems = match s.shape.as_slice() {
        [r, c] => r.checked_mul(*c),
        _ => None,
    };
    let expected = elems.and_then(|e| e.checked_mul(dtype.size_bytes() as u64));
    if block.contains(&0)
        || s.data_end < s.data_start
        || expected != Some(s.data_end - s.data_start)
    {
        return Err(bad(format!(
            "shape {:?}, block {block:?} and bytes {}..{} do not agree",
            s.shape, s.data_start, s.data_end
        )));
    }
    Ok(BlockScales {
        name: s.name.clone(),
        source_file: s.source_file.clone(),
        dtype,
        shape: s.shape.clone(),
        data_start: s.data_start,
        data_end: s.data_end,
        block,
    })
}

impl TryFrom<&TensorSlice> for PlannedTensor {
    type Error = ConvertError;

    fn try_from(t: &TensorSlice) -> Result<Self, Self::Error> {
        let dtype =
            DType::from_safetensors(&t.dtype).ok_or_else(|| ConvertError::UnknownDtype {
                tensor: t.name.clone(),
                dtype: t.dtype.clone(),
            })?;
        if t.data_end < t.data_start {
            return Err(ConvertError::BadRange {
                tensor: t.name.clone(),
                start: t.data_start,
                end: t.data_end,
            });
        }
        Ok(PlannedTensor {
            name: t.name.clone(),
            source_file: t.source_file.clone(),
            dtype,
            shape: t.shape.clone(),
            data_start: t.data_start,
            data_end: t.data_end,
            scales: t
                .scales
                .as_ref()
                .map(|s| block_scales(&t.name, s))
                .transpose()?,
            packed: t
                .packed
                .as_ref()
                .map(|p| packed_ints(&t.name, p))
                .transpose()?,
        })
    }
}

impl TensorResult {
    /// The metrics carried by this result, if the tensor was transformed.
    pub fn metrics(&self) -> Option<TensorMetrics> {
        self.has_metrics.then_some(TensorMetrics {
            rel_fro_error: self.rel_fro_error,
            snr_db: self.snr_db,
            cosine: self.cosine,
            max_abs_error: self.max_abs_error,
        })
    }

    /// Stores `metrics` into the wire fields.
    pub fn set_metrics(&mut self, metrics: &TensorMetrics) {
        self.has_metrics = true;
        self.rel_fro_error = metrics.rel_fro_error;
        self.snr_db = metrics.snr_db;
        self.cosine = metrics.cosine;
        self.max_abs_error = metrics.max_abs_error;
    }
}

impl JobStatus {
    /// True once the job can change no more (an unknown state is not terminal).
    pub fn is_terminal(&self) -> bool {
        self.state().is_terminal()
    }
}

impl JobState {
    /// True once the job can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Lower-case name for humans.
    pub fn label(self) -> &'static str {
        match self {
            JobState::Unspecified => "unknown",
            JobState::Running => "running",
            JobState::Finalizing => "finalizing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}
