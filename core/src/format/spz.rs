//! `.spz` output (`--format spz`): every task writes a *part* of records (each chunk's
//! entropy-coded frame, prefixed with its length), and a worker assembles the parts into one
//! `model.spz` archive with an index ([`crate::spz`] defines the archive's layout), which
//! `shardpress decompress` restores. Scales are on the same grid as in every other format
//! (`set_scale_grid`), so the archive restores exactly what `--format safetensors` writes.

use super::{
    Assembly, FinishPlan, FinishedTask, Format, FormatError, OutputTensor, TensorDesc, TensorWriter,
};
use crate::codec::TensorPlan;
use crate::recipe::Recipe;

/// The `.spz` format; see the module docs.
pub struct Spz;

/// Folder (under the output) where the tasks of an `.spz` job write their parts.
pub const PARTS_DIR: &str = ".spz-parts";

/// Object name of the assembled archive.
pub const ARCHIVE_NAME: &str = "model.spz";

impl Format for Spz {
    fn name(&self) -> &'static str {
        "spz"
    }

    fn describe(&self) -> &'static str {
        "spz (compact representations, entropy-coded)"
    }

    /// Everything a recipe can ask for has a frame (`non_finite: keep` rows included).
    fn check_recipe(&self, _recipe: &Recipe) -> Result<(), FormatError> {
        Ok(())
    }

    fn assembles_parts(&self) -> bool {
        true
    }

    fn task_output_name(&self, index: usize, total: usize) -> String {
        format!("{PARTS_DIR}/part-{:05}-of-{total:05}.bin", index + 1)
    }

    fn output_tensors(&self, _tensor: TensorDesc<'_>, _plan: &TensorPlan) -> Vec<OutputTensor> {
        Vec::new()
    }

    fn tensor_writer(&self, _tensor: TensorDesc<'_>, _plan: &TensorPlan) -> TensorWriter {
        TensorWriter::Frames
    }

    fn finish_plan(&self, _tasks: &[FinishedTask<'_>]) -> FinishPlan {
        FinishPlan {
            index: None,
            quantization_config: None,
            copy_companions: false,
            assembly: Some(Assembly::Spz),
        }
    }
}
