//! Dequantized safetensors output (`--format safetensors`, the default): one shard per task,
//! every tensor under its own name in its input dtype, holding what a reader of the
//! compressed form would compute. Any safetensors loader reads it; it is as large as the input.

use super::{
    shard_index, FinishPlan, FinishedTask, Format, FormatError, OutputTensor, TensorDesc,
    TensorWriter,
};
use crate::codec::TensorPlan;
use crate::recipe::Recipe;

/// The dequantized safetensors format; see the module docs.
pub struct Safetensors;

/// `model-{index+1:05}-of-{total:05}.safetensors`, the Hugging Face shard name.
pub fn shard_name(index: usize, total: usize) -> String {
    format!("model-{:05}-of-{total:05}.safetensors", index + 1)
}

impl Format for Safetensors {
    fn name(&self) -> &'static str {
        "safetensors"
    }

    fn describe(&self) -> &'static str {
        "safetensors (dequantized, input dtype)"
    }

    fn check_recipe(&self, recipe: &Recipe) -> Result<(), FormatError> {
        if recipe.passes.is_empty() {
            return Err(FormatError::Recipe {
                format: "safetensors",
                recipe: recipe.name.clone(),
                reason: "would be a plain copy: the recipe has no lossy pass (use --format spz for lossless compression)".into(),
            });
        }
        Ok(())
    }

    fn task_output_name(&self, index: usize, total: usize) -> String {
        shard_name(index, total)
    }

    fn output_tensors(&self, tensor: TensorDesc<'_>, _plan: &TensorPlan) -> Vec<OutputTensor> {
        vec![OutputTensor {
            name: tensor.name.to_owned(),
            dtype: tensor.dtype,
            shape: tensor.shape.to_vec(),
        }]
    }

    fn tensor_writer(&self, _tensor: TensorDesc<'_>, _plan: &TensorPlan) -> TensorWriter {
        TensorWriter::Reconstruction
    }

    fn finish_plan(&self, tasks: &[FinishedTask<'_>]) -> FinishPlan {
        FinishPlan {
            index: Some(shard_index(self, tasks)),
            quantization_config: None,
            copy_companions: true,
            assembly: None,
        }
    }
}
