//! Minimal query-string parsing for handshakes and HTTP routes.

/// The first value of `name` in `query` (`a=1&b=2`), percent-decoded; `+` means space.
pub fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(key)? == name).then(|| decode(value)).flatten()
    })
}

/// Percent-decodes `input`; `None` if the result is not UTF-8 or an escape is malformed.
pub fn decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = input.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_decodes_parameters() {
        assert_eq!(
            param("a=1&userId=Us%C3%A9r+1", "userId").as_deref(),
            Some("Usér 1")
        );
        assert_eq!(param("userId=", "userId").as_deref(), Some(""));
        assert_eq!(param("x=1", "userId"), None);
        assert_eq!(param("userId=%zz", "userId"), None);
        assert_eq!(param("userId=%e", "userId"), None);
    }
}
