//! The fixed-choice settings of `[sample]` and `[eval]` as enums: the ODE solver and the
//! divergence of the continuous-time likelihood. Each reads and writes the same lower-case
//! string a config has always held (`"dopri5"`, `"auto"`), read case-insensitively as the
//! string settings of earlier releases were, so saved `config.json` files load unchanged, and a
//! typo is an error at load time that lists the valid names instead of a failure at the first
//! held-out evaluation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Declares a string-backed choice: the variants and their names, `FromStr`, `Display` and
/// serde through the name.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),*];

            /// The name a config holds.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($text => Ok(Self::$variant),)*
                    _ => Err(Error::Config(format!(
                        "unknown {} '{s}'; use one of: {}",
                        $what,
                        Self::NAMES.join(", ")
                    ))),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;

            fn try_from(s: String) -> Result<Self> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(c: $name) -> String {
                c.as_str().to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice! {
    /// The ODE solver of ODE sampling and of the continuous-time likelihood
    /// ([`crate::continuous::ode::Solver`]).
    SolverName, "ODE solver" {
        /// Forward Euler with `steps` fixed steps.
        Euler = "euler",
        /// Heun's method (explicit trapezoid rule) with `steps` fixed steps.
        Heun = "heun",
        /// Adaptive Dormand-Prince 5(4) with `rtol` / `atol` (Dormand & Prince 1980).
        #[default]
        Dopri5 = "dopri5",
    }
}

choice! {
    /// How the continuous-time likelihood computes the divergence of the field
    /// ([`crate::continuous::cnf::Divergence`]).
    DivergenceChoice, "divergence" {
        /// Exact up to `eval.exact_max_dim` dimensions, Hutchinson's estimator above.
        #[default]
        Auto = "auto",
        /// The exact trace of the Jacobian (one tangent per dimension).
        Exact = "exact",
        /// Hutchinson's estimator with `eval.probes` Rademacher probes (Hutchinson 1989).
        Hutchinson = "hutchinson",
    }
}

impl DivergenceChoice {
    /// Whether the likelihood of `dim`-dimensional data uses the exact divergence.
    pub fn is_exact(self, dim: usize, exact_max_dim: usize) -> bool {
        match self {
            Self::Auto => dim <= exact_max_dim,
            Self::Exact => true,
            Self::Hutchinson => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_typos_list_the_choices() {
        for s in SolverName::NAMES {
            let v: SolverName = s.parse().unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<SolverName>(&format!("\"{s}\"")).unwrap(),
                v
            );
        }
        assert_eq!("Dopri5".parse::<SolverName>().unwrap(), SolverName::Dopri5);
        let e = "exactt"
            .parse::<DivergenceChoice>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactt") && e.contains("hutchinson"), "{e}");
        let e = serde_json::from_str::<SolverName>("\"rk4\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rk4") && e.contains("dopri5"), "{e}");
    }
}
