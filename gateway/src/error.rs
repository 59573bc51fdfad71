//! Why the gateway stopped.

/// Errors of [`crate::serve`]; the binary reports them and exits.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The listener failed.
    #[error("listener failed")]
    Io(#[from] std::io::Error),
    /// gRPC reflection could not read the descriptors.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
}
