//! The msgpack primitives under the messages: an encoder that always picks the form msgspec
//! picks (over `rmp::encode`), and a bounds-checked slice reader that never panics and never
//! allocates more than the bytes it has seen can hold.

use crate::DecodeError;

/// Where a decode error happened, innermost last once formatted (`$[2].n`).
#[derive(Debug)]
pub(crate) enum Seg {
    Index(usize),
    Field(&'static str),
    Key,
}

/// A decode failure on its way out: the message plus the path, collected while unwinding.
/// Boxed so that `Res<T>` stays small on the hot (successful) path.
#[derive(Debug)]
pub(crate) struct Fail {
    msg: String,
    /// Outermost last (segments are pushed while the error propagates up).
    path: Vec<Seg>,
}

pub(crate) type Res<T> = Result<T, Box<Fail>>;

pub(crate) fn fail<T>(msg: impl Into<String>) -> Res<T> {
    Err(Box::new(Fail {
        msg: msg.into(),
        path: Vec::new(),
    }))
}

impl Fail {
    /// Adds one path segment (called by each enclosing container on the way out).
    pub(crate) fn at(mut self: Box<Self>, seg: Seg) -> Box<Self> {
        self.path.push(seg);
        self
    }

    pub(crate) fn into_error(self) -> DecodeError {
        if self.path.is_empty() {
            return DecodeError(self.msg);
        }
        let mut path = String::from("$");
        let mut key = false;
        for seg in self.path.iter().rev() {
            match seg {
                Seg::Index(i) => path.push_str(&format!("[{i}]")),
                Seg::Field(name) => {
                    path.push('.');
                    path.push_str(name);
                }
                Seg::Key => key = true,
            }
        }
        if key {
            DecodeError(format!("{} - at `key` in `{path}`", self.msg))
        } else {
            DecodeError(format!("{} - at `{path}`", self.msg))
        }
    }
}

/// msgspec's name of the msgpack type a marker byte starts.
fn kind(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => "int",
        0x80..=0x8f | 0xde | 0xdf => "object",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "null",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bytes",
        0xc7..=0xc9 | 0xd4..=0xd8 => "ext",
        0xca | 0xcb => "float",
        _ => "invalid opcode",
    }
}

/// The error for a value of the wrong msgpack type (0xc1 is malformed data, not a type).
fn expected<T>(what: &str, marker: u8) -> Res<T> {
    if marker == 0xc1 {
        return fail("MessagePack data is malformed: invalid opcode '\\xc1'");
    }
    fail(format!("Expected `{what}`, got `{}`", kind(marker)))
}

/// Appends msgpack to a Vec in msgspec's choice of forms: smallest int form (uint forms for
/// non-negative values), float64 always, smallest str/bin/array/map headers.
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
}

// Writing into a Vec<u8> cannot fail, so rmp's Results carry nothing worth handling.
macro_rules! infallible {
    ($e:expr) => {
        if let Err(err) = $e {
            unreachable!("msgpack write to a Vec failed: {err:?}")
        }
    };
}

/// A length as msgpack's u32 (no message on these paths comes near 4 GiB).
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Enc {
    pub(crate) fn new() -> Self {
        Enc {
            buf: Vec::with_capacity(64),
        }
    }

    #[inline]
    pub(crate) fn int(&mut self, v: i64) {
        infallible!(rmp::encode::write_sint(&mut self.buf, v));
    }

    pub(crate) fn uint(&mut self, v: u64) {
        infallible!(rmp::encode::write_uint(&mut self.buf, v));
    }

    #[inline]
    pub(crate) fn float(&mut self, v: f64) {
        infallible!(rmp::encode::write_f64(&mut self.buf, v));
    }

    #[inline]
    pub(crate) fn boolean(&mut self, v: bool) {
        infallible!(rmp::encode::write_bool(&mut self.buf, v));
    }

    #[inline]
    pub(crate) fn nil(&mut self) {
        infallible!(rmp::encode::write_nil(&mut self.buf));
    }

    #[inline]
    pub(crate) fn str(&mut self, s: &str) {
        infallible!(rmp::encode::write_str(&mut self.buf, s));
    }

    pub(crate) fn bin(&mut self, b: &[u8]) {
        infallible!(rmp::encode::write_bin(&mut self.buf, b));
    }

    #[inline]
    pub(crate) fn array(&mut self, len: usize) {
        infallible!(rmp::encode::write_array_len(&mut self.buf, len32(len)));
    }

    #[inline]
    pub(crate) fn map(&mut self, len: usize) {
        infallible!(rmp::encode::write_map_len(&mut self.buf, len32(len)));
    }

    /// Starts a map-struct's header before its field count is known, as msgspec does for an
    /// omit_defaults struct: a fixmap placeholder if the struct has at most 15 fields, else a
    /// map16 one (whatever the count turns out to be). Returns where to patch the count.
    pub(crate) fn map_header_placeholder(&mut self, nfields: usize) -> usize {
        let at = self.buf.len();
        if nfields < 16 {
            self.buf.push(0x80);
        } else {
            self.buf.extend_from_slice(&[0xde, 0, 0]);
        }
        at
    }

    pub(crate) fn patch_map_header(&mut self, at: usize, nfields: usize, count: usize) {
        if nfields < 16 {
            self.buf[at] = 0x80 | count as u8;
        } else {
            self.buf[at + 1..at + 3].copy_from_slice(&(count as u16).to_be_bytes());
        }
    }
}

/// A cursor over one frame.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

const TRUNCATED: &str = "Input data was truncated";

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless the whole frame was consumed (msgspec: "trailing characters").
    pub(crate) fn finish(&self) -> Res<()> {
        if self.pos != self.buf.len() {
            return fail(format!(
                "MessagePack data is malformed: trailing characters (byte {})",
                self.pos
            ));
        }
        Ok(())
    }

    #[inline]
    fn byte(&mut self) -> Res<u8> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => fail(TRUNCATED),
        }
    }

    #[inline]
    pub(crate) fn peek(&self) -> Res<u8> {
        match self.buf.get(self.pos) {
            Some(&b) => Ok(b),
            None => fail(TRUNCATED),
        }
    }

    /// `n` bytes, checked against what is left before anything is taken.
    #[inline]
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if n > self.remaining() {
            return fail(TRUNCATED);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    #[inline]
    fn be<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len8(&mut self) -> Res<usize> {
        Ok(self.byte()? as usize)
    }

    fn len16(&mut self) -> Res<usize> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }

    fn len32(&mut self) -> Res<usize> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// The integer after `marker` (already read), or None if `marker` does not start one.
    #[inline]
    fn int_after(&mut self, marker: u8) -> Res<Option<i128>> {
        Ok(Some(match marker {
            0x00..=0x7f => marker as i128,
            0xe0..=0xff => marker as i8 as i128,
            0xcc => self.byte()? as i128,
            0xcd => u16::from_be_bytes(self.be()?) as i128,
            0xce => u32::from_be_bytes(self.be()?) as i128,
            0xcf => u64::from_be_bytes(self.be()?) as i128,
            0xd0 => self.byte()? as i8 as i128,
            0xd1 => i16::from_be_bytes(self.be()?) as i128,
            0xd2 => i32::from_be_bytes(self.be()?) as i128,
            0xd3 => i64::from_be_bytes(self.be()?) as i128,
            _ => return Ok(None),
        }))
    }

    /// Any msgpack integer (int64 and uint64 ranges both fit i128).
    pub(crate) fn int(&mut self) -> Res<i128> {
        let marker = self.byte()?;
        match self.int_after(marker)? {
            Some(v) => Ok(v),
            None => expected("int", marker),
        }
    }

    #[inline]
    pub(crate) fn i64(&mut self) -> Res<i64> {
        if let Some(&b @ 0..=0x7f) = self.buf.get(self.pos) {
            self.pos += 1;
            return Ok(b as i64);
        }
        let v = self.int()?;
        i64::try_from(v).or_else(|_| fail(format!("Integer {v} out of range for i64 (Rust)")))
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Res<u32> {
        if let Some(&b @ 0..=0x7f) = self.buf.get(self.pos) {
            self.pos += 1;
            return Ok(b as u32);
        }
        let v = self.int()?;
        u32::try_from(v).or_else(|_| fail(format!("Integer {v} out of range for u32 (Rust)")))
    }

    /// A float field: float32, float64 or any integer (msgspec converts ints).
    pub(crate) fn float(&mut self) -> Res<f64> {
        let marker = self.byte()?;
        match marker {
            0xca => Ok(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Ok(f64::from_be_bytes(self.be()?)),
            _ => match self.int_after(marker)? {
                Some(v) => Ok(v as f64),
                None => expected("float", marker),
            },
        }
    }

    pub(crate) fn boolean(&mut self) -> Res<bool> {
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            m => expected("bool", m),
        }
    }

    /// Consumes a nil if one is next.
    pub(crate) fn nil(&mut self) -> Res<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// The length of a str whose marker was read, or None if `marker` does not start one.
    #[inline]
    fn str_len(&mut self, marker: u8) -> Res<Option<usize>> {
        Ok(Some(match marker {
            0xa0..=0xbf => (marker & 0x1f) as usize,
            0xd9 => self.len8()?,
            0xda => self.len16()?,
            0xdb => self.len32()?,
            _ => return Ok(None),
        }))
    }

    #[inline]
    fn utf8(bytes: &'a [u8]) -> Res<&'a str> {
        std::str::from_utf8(bytes).or_else(|_| fail("Invalid UTF-8 encoded string"))
    }

    pub(crate) fn str(&mut self) -> Res<&'a str> {
        let marker = self.byte()?;
        match self.str_len(marker)? {
            Some(n) => Self::utf8(self.take(n)?),
            None => expected("str", marker),
        }
    }

    /// A str's raw bytes, UTF-8 unchecked (map keys).
    pub(crate) fn str_bytes(&mut self) -> Res<&'a [u8]> {
        let marker = self.byte()?;
        match self.str_len(marker)? {
            Some(n) => self.take(n),
            None => expected("str", marker),
        }
    }

    /// A str or an int (`stop_reason`): Ok(Err(text)) / Ok(Ok(int)).
    pub(crate) fn int_or_str(&mut self) -> Res<Result<i128, &'a str>> {
        let marker = self.byte()?;
        if let Some(v) = self.int_after(marker)? {
            return Ok(Ok(v));
        }
        match self.str_len(marker)? {
            Some(n) => Ok(Err(Self::utf8(self.take(n)?)?)),
            None => expected("int | str | null", marker),
        }
    }

    pub(crate) fn bin(&mut self) -> Res<&'a [u8]> {
        let marker = self.byte()?;
        let n = match marker {
            0xc4 => self.len8()?,
            0xc5 => self.len16()?,
            0xc6 => self.len32()?,
            m => return expected("bytes", m),
        };
        self.take(n)
    }

    pub(crate) fn array(&mut self) -> Res<usize> {
        let marker = self.byte()?;
        match marker {
            0x90..=0x9f => Ok((marker & 0x0f) as usize),
            0xdc => self.len16(),
            0xdd => self.len32(),
            m => expected("array", m),
        }
    }

    pub(crate) fn map(&mut self) -> Res<usize> {
        let marker = self.byte()?;
        match marker {
            0x80..=0x8f => Ok((marker & 0x0f) as usize),
            0xde => self.len16(),
            0xdf => self.len32(),
            m => expected("object", m),
        }
    }

    /// The capacity to reserve for `n` claimed elements of `T`: no more than the rest of the
    /// frame could hold (each element is at least one byte) and no more than 1 MiB up front
    /// (a struct element is much bigger than its smallest encoding). A forged 4-GB header
    /// reserves nothing of the sort; a real long list grows past the cap as it is read.
    #[inline]
    pub(crate) fn capacity<T>(&self, n: usize) -> usize {
        const MAX_RESERVE_BYTES: usize = 1 << 20;
        n.min(self.remaining())
            .min(MAX_RESERVE_BYTES / std::mem::size_of::<T>().max(1))
    }

    /// Skips `n` whole values of any type without recursion (nesting depth is unbounded) and
    /// without checking UTF-8, as msgspec skips unknown fields.
    pub(crate) fn skip(&mut self, n: usize) -> Res<()> {
        let mut pending: u64 = n as u64;
        while pending > 0 {
            pending -= 1;
            let marker = self.byte()?;
            let data = match marker {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                0x80..=0x8f => {
                    pending += 2 * (marker & 0x0f) as u64;
                    0
                }
                0x90..=0x9f => {
                    pending += (marker & 0x0f) as u64;
                    0
                }
                0xa0..=0xbf => (marker & 0x1f) as usize,
                0xc4 | 0xd9 => self.len8()?,
                0xc5 | 0xda => self.len16()?,
                0xc6 | 0xdb => self.len32()?,
                0xc7 => self.len8()? + 1,
                0xc8 => self.len16()? + 1,
                0xc9 => self.len32()? + 1,
                0xca => 4,
                0xcb => 8,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xce | 0xd2 => 4,
                0xcf | 0xd3 => 8,
                0xd4 => 2,
                0xd5 => 3,
                0xd6 => 5,
                0xd7 => 9,
                0xd8 => 17,
                0xdc => {
                    pending += self.len16()? as u64;
                    0
                }
                0xdd => {
                    pending += self.len32()? as u64;
                    0
                }
                0xde => {
                    pending += 2 * self.len16()? as u64;
                    0
                }
                0xdf => {
                    pending += 2 * self.len32()? as u64;
                    0
                }
                _ => return expected("", 0xc1),
            };
            self.take(data)?;
            // Every pending value needs at least one more byte: give up early on a forged count.
            if pending > self.remaining() as u64 {
                return fail(TRUNCATED);
            }
        }
        Ok(())
    }
}
