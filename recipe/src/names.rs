//! The closed sets of names a recipe uses: plain data, written and read by
//! name. What a camera move or a scheduler does lives in the engine.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An enum of names: `ALL`, `name()`, `FromStr` with an error listing the
/// names, `Display`, and serde as the name (an unknown one is refused with
/// the same message).
macro_rules! names {
    ($(#[$meta:meta])* $ty:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident => $name:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $ty {
            $($(#[$vmeta])* $variant),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    format!(
                        concat!("unknown ", $what, " `{}` (expected one of: {})"),
                        s,
                        $ty::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
                    )
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

names!(
    /// How the picture content moves: pan-left shifts it left, tilt-up up,
    /// zoom-in enlarges it, roll-cw turns it clockwise.
    CameraMove, "camera move", {
        ZoomIn => "zoom-in",
        ZoomOut => "zoom-out",
        PanLeft => "pan-left",
        PanRight => "pan-right",
        TiltUp => "tilt-up",
        TiltDown => "tilt-down",
        RollCw => "roll-cw",
        RollCcw => "roll-ccw",
    }
);

names!(
    /// The sampler of the denoising loop, as `--scheduler` spells it.
    Scheduler, "scheduler", {
        /// diffusers' DDIMScheduler.
        Ddim => "ddim",
        /// EulerDiscreteScheduler.
        Euler => "euler",
        /// EulerAncestralDiscreteScheduler.
        EulerAncestral => "euler-a",
        /// DPMSolverMultistepScheduler (2nd order).
        DpmPp2m => "dpm++2m",
        /// LCMScheduler.
        Lcm => "lcm",
        /// UniPCMultistepScheduler with flow sigmas (Wan's own).
        UniPc => "unipc",
        /// FlowMatchEulerDiscreteScheduler (Wan; `euler` on a Wan model).
        FlowEuler => "flow-euler",
    }
);

names!(
    /// The container a server job's clip is written in.
    OutputFormat, "format", {
        Mp4 => "mp4",
        Gif => "gif",
        Webp => "webp",
    }
);

impl OutputFormat {
    /// The file extension (the name itself).
    pub fn extension(self) -> &'static str {
        self.name()
    }
}
