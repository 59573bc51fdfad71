//! The protobuf codec every generated client and server uses: prost's, with
//! small initial buffers.
//!
//! tonic gives every call or stream an encode and a decode buffer of 8 KiB up
//! front. A chat server holds tens of thousands of idle streams, so that is
//! 16 KiB per connection spent on nothing; the buffers grow on demand, so a
//! small start costs only a reallocation for the rare large frame.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of each encode and decode buffer.
const INITIAL_BUFFER: usize = 512;
/// Encoded bytes after which a streaming encoder yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`INITIAL_BUFFER`]-byte initial buffers.
#[derive(Debug, Clone)]
pub struct SmallCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }
}
