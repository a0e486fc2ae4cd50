//! Encoding key presses as the bytes a terminal sends, for the command's pty (xterm's
//! conventions, as in `ctlseqs`: "PC-Style Function Keys", "Cursor Keys").

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// The bytes a terminal sends for `key`. `application_cursor` is DECCKM (set by full-screen
/// programs such as `less` and `vim`): arrows then send `ESC O x` instead of `ESC [ x`.
/// Returns nothing for keys a terminal does not send (e.g. a bare modifier).
pub fn encode(key: KeyEvent, application_cursor: bool) -> Vec<u8> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    let alt = key.modifiers.contains(KeyModifiers::ALT);
    let mut out = Vec::new();
    if alt {
        out.push(0x1b);
    }
    let cursor = |c: u8| if application_cursor { vec![0x1b, b'O', c] } else { vec![0x1b, b'[', c] };
    let tilde = |n: &str| format!("\x1b[{n}~").into_bytes();
    let bytes = match key.code {
        KeyCode::Char(c) if ctrl => match c.to_ascii_lowercase() {
            c @ 'a'..='z' => vec![c as u8 - b'a' + 1],
            '@' | ' ' | '2' => vec![0],
            '[' | '3' => vec![0x1b],
            '\\' | '4' => vec![0x1c],
            ']' | '5' => vec![0x1d],
            '^' | '6' => vec![0x1e],
            '_' | '/' | '7' => vec![0x1f],
            '?' | '8' => vec![0x7f],
            other => other.to_string().into_bytes(),
        },
        KeyCode::Char(c) => c.to_string().into_bytes(),
        KeyCode::Enter => vec![b'\r'],
        KeyCode::Tab => vec![b'\t'],
        KeyCode::BackTab => b"\x1b[Z".to_vec(),
        KeyCode::Backspace => vec![0x7f],
        KeyCode::Esc => vec![0x1b],
        KeyCode::Up => cursor(b'A'),
        KeyCode::Down => cursor(b'B'),
        KeyCode::Right => cursor(b'C'),
        KeyCode::Left => cursor(b'D'),
        KeyCode::Home => cursor(b'H'),
        KeyCode::End => cursor(b'F'),
        KeyCode::Insert => tilde("2"),
        KeyCode::Delete => tilde("3"),
        KeyCode::PageUp => tilde("5"),
        KeyCode::PageDown => tilde("6"),
        KeyCode::F(n @ 1..=4) => vec![0x1b, b'O', b'P' + n - 1],
        KeyCode::F(n) => match n {
            5 => tilde("15"),
            6 => tilde("17"),
            7 => tilde("18"),
            8 => tilde("19"),
            9 => tilde("20"),
            10 => tilde("21"),
            11 => tilde("23"),
            12 => tilde("24"),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    if bytes.is_empty() {
        return bytes;
    }
    out.extend(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(code: KeyCode, m: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, m)
    }

    #[test]
    fn printable_and_control_keys() {
        assert_eq!(encode(k(KeyCode::Char('é'), KeyModifiers::NONE), false), "é".as_bytes());
        assert_eq!(encode(k(KeyCode::Char('c'), KeyModifiers::CONTROL), false), [3]);
        assert_eq!(encode(k(KeyCode::Char('D'), KeyModifiers::CONTROL), false), [4]);
        assert_eq!(encode(k(KeyCode::Char('b'), KeyModifiers::ALT), false), b"\x1bb");
        assert_eq!(encode(k(KeyCode::Enter, KeyModifiers::NONE), false), b"\r");
        assert_eq!(encode(k(KeyCode::Backspace, KeyModifiers::NONE), false), [0x7f]);
    }

    #[test]
    fn cursor_keys_follow_decckm() {
        assert_eq!(encode(k(KeyCode::Up, KeyModifiers::NONE), false), b"\x1b[A");
        assert_eq!(encode(k(KeyCode::Up, KeyModifiers::NONE), true), b"\x1bOA");
        assert_eq!(encode(k(KeyCode::PageDown, KeyModifiers::NONE), true), b"\x1b[6~");
        assert_eq!(encode(k(KeyCode::F(1), KeyModifiers::NONE), false), b"\x1bOP");
        assert_eq!(encode(k(KeyCode::F(5), KeyModifiers::NONE), false), b"\x1b[15~");
        assert!(encode(k(KeyCode::CapsLock, KeyModifiers::NONE), false).is_empty());
    }
}
