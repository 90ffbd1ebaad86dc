//! The user's choices of hardware — `--device` and `--precision` — and the one place that turns a device
//! into a backend (`Device::open`, then `on_backend!` runs code generic over it).

use serde::{Deserialize, Serialize};

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{probe, Cuda};
use crate::error::{Error, Result};

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// A GPU when there is one, else the CPU (saying why).
    #[default]
    Auto,
    /// The CPU reference backend (every core, fp32).
    Cpu,
    /// The CUDA backend on GPU 0 (an error naming why when there is no usable GPU).
    Cuda,
    /// The CUDA backend on the emulated device (a test device, slow).
    Emu,
}

/// `--precision`: what activations and products are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a GPU that has it (compute capability 8.0 or newer), else fp32.
    #[default]
    Auto,
    Fp32,
    Bf16,
    /// fp16 with dynamic loss scaling.
    Fp16,
}

/// The name a user types for a choice (`--device`, `--precision`, `--lr-scheduler`, ...).
pub fn name<T: clap::ValueEnum>(choice: T) -> String {
    choice.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

/// A choice from the name a user types, or an error listing the choices.
pub fn parse<T: clap::ValueEnum>(name: &str) -> Result<T> {
    T::from_str(name, false).map_err(|_| {
        let names: Vec<String> = T::value_variants().iter().map(|v| self::name(v.clone())).collect();
        Error::Invalid(format!("{name:?}: choose {}", names.join(", ")))
    })
}

/// An open backend.
pub enum Opened {
    Cpu(Cpu<f32>),
    Cuda(Box<Cuda>),
}

impl Device {
    /// The backend this device names; `auto` falls back to the CPU, saying why on stderr.
    pub fn open(self) -> Result<Opened> {
        match self {
            Device::Cpu => Ok(Opened::Cpu(Cpu::new())),
            Device::Cuda => Ok(Opened::Cuda(Box::new(Cuda::new(0)?))),
            Device::Emu => Ok(Opened::Cuda(Box::new(Cuda::emulated(
                crate::backend::device::emu::EmuOptions::from_env(),
            )?))),
            Device::Auto => match probe().map_err(Error::Invalid).and_then(|_| Cuda::new(0)) {
                Ok(c) => Ok(Opened::Cuda(Box::new(c))),
                Err(why) => {
                    eprintln!(
                        "no usable GPU ({}); running on the CPU",
                        why.to_string().trim_start_matches("--device cuda: ")
                    );
                    Ok(Opened::Cpu(Cpu::new()))
                }
            },
        }
    }
}

/// Run `$body` with `$be` bound to (a reference to) the backend of an [`Opened`]: code generic over
/// `B: Backend`, instantiated for each backend.
macro_rules! on_backend {
    ($opened:expr, $be:ident => $body:expr) => {
        match $opened {
            $crate::backend::choice::Opened::Cpu(c) => {
                let $be = &c;
                $body
            }
            $crate::backend::choice::Opened::Cuda(c) => {
                let $be = &*c;
                $body
            }
        }
    };
}
pub(crate) use on_backend;
