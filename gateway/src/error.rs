//! The one error `pubgate` can stop with, and the exit code each kind means to scripts and
//! supervisors: 2 for a configuration that cannot work (fix the settings, do not restart in a
//! loop), 1 for a failure while running.

use std::process::ExitCode;

use crate::tls::TlsError;

/// Why `pubgate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is unusable: a bad value, a broken file, a logger filter that does not parse.
    #[error("{0}")]
    Config(String),
    /// The TLS certificate or key cannot be used (a configuration error, like a bad key); the
    /// chain says which file and why.
    #[error("{0:#}")]
    Tls(anyhow::Error),
    /// The node failed while starting or running (a port in use, the runtime, the listener).
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

impl Error {
    /// A configuration error from anything that says what is wrong.
    pub fn config(e: impl std::fmt::Display) -> Self {
        Error::Config(e.to_string())
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(_) | Error::Tls(_) => ExitCode::from(2),
            Error::Runtime(_) => ExitCode::FAILURE,
        }
    }
}

impl From<anyhow::Error> for Error {
    /// Keeps a TLS error found anywhere in the chain a configuration error.
    fn from(e: anyhow::Error) -> Self {
        if e.downcast_ref::<TlsError>().is_some() {
            Error::Tls(e)
        } else if e.downcast_ref::<crate::jwt::JwtConfigError>().is_some() {
            Error::Config(format!("{e:#}"))
        } else {
            Error::Runtime(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_exit_2_and_runtime_errors_exit_1() {
        let bind = Error::from(anyhow::anyhow!("address in use"));
        assert!(matches!(bind, Error::Runtime(_)));
        assert_eq!(bind.exit_code(), ExitCode::FAILURE);
        assert_eq!(
            Error::config("log.level: bad").exit_code(),
            ExitCode::from(2)
        );
        assert_eq!(Error::config("x").to_string(), "x");
    }
}
