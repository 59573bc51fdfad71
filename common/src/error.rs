//! One small set of error codes, mapped to gRPC codes and HTTP statuses, so that
//! every service and transport reports the same cause the same way.

use tonic::Code;

/// What went wrong, as a client can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range.
    BadRequest,
    /// No valid credentials.
    Unauthenticated,
    /// Authenticated, but not allowed.
    PermissionDenied,
    /// The thing does not exist, or the caller may not know that it does.
    NotFound,
    /// The thing exists already.
    AlreadyExists,
    /// A size or rate limit was exceeded.
    TooLarge,
    /// The server cannot serve the request now; retry later.
    Unavailable,
    /// A bug or a failed dependency; details are in the server's log only.
    Internal,
}

impl ErrorCode {
    /// Returns the gRPC status code.
    pub fn grpc(self) -> Code {
        match self {
            Self::BadRequest => Code::InvalidArgument,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::TooLarge => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::Internal => Code::Internal,
        }
    }

    /// Returns the HTTP status.
    pub fn http(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::BadRequest => S::BAD_REQUEST,
            Self::Unauthenticated => S::UNAUTHORIZED,
            Self::PermissionDenied => S::FORBIDDEN,
            Self::NotFound => S::NOT_FOUND,
            Self::AlreadyExists => S::CONFLICT,
            Self::TooLarge => S::PAYLOAD_TOO_LARGE,
            Self::Unavailable => S::SERVICE_UNAVAILABLE,
            Self::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// Returns the status with `message`; internal errors hide their details.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        if self == Self::Internal {
            return tonic::Status::internal("internal error");
        }
        tonic::Status::new(self.grpc(), message)
    }
}

/// Logs an internal error once, with its source chain, and returns the clean status
/// the client gets.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> tonic::Status {
    tracing::error!(error = %error, source = ?error.source(), "internal error");
    tonic::Status::internal("internal error")
}
