//! The signed envelope of control messages: arbitrary bytes and arbitrary edits of a genuine
//! payload are refused with an error, never a panic, and never accepted unless unchanged.

use afc_domain::model::{Ident, Timestamp};
use afc_domain::signed::{open, open_gate, seal, GATE_KEY_ID};
use afc_domain::wire::{Command, CommandKind, ModeMessage, TxAck};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

const TOPIC: &str = "afc/v1/s1/gates/g01/cmd";

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn command(expires_at: i64) -> Command {
    Command {
        id: "c-1".into(),
        gate: Ident::new("g01").unwrap(),
        command: CommandKind::OpenOnceEntry,
        expires_at: Timestamp(expires_at),
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let k = key().verifying_key();
        prop_assert!(open::<Command>(TOPIC, &bytes, |_| Some(k)).is_err());
        prop_assert!(open::<ModeMessage>(TOPIC, &bytes, |_| Some(k)).is_err());
        prop_assert!(open_gate::<TxAck>(TOPIC, &bytes, &k).is_err());
    }

    #[test]
    fn any_edit_of_a_genuine_payload_is_refused(expires in any::<i64>(), at in any::<usize>(), byte in any::<u8>()) {
        let payload = seal(TOPIC, &command(expires), 1, &key());
        let k = key().verifying_key();
        let genuine: Command = open(TOPIC, &payload, |id| (id == 1).then_some(k)).unwrap();
        prop_assert_eq!(&genuine, &command(expires));
        let mut edited = payload.clone();
        let i = at % edited.len();
        prop_assume!(edited[i] != byte);
        edited[i] = byte;
        // A change outside the signed bytes can leave the envelope equivalent (e.g. whitespace);
        // whatever opens must then be exactly the genuine message.
        if let Ok(c) = open::<Command>(TOPIC, &edited, |id| (id == 1).then_some(k)) {
            prop_assert_eq!(c, command(expires));
        }
        // Truncated anywhere: refused.
        prop_assert!(open::<Command>(TOPIC, &payload[..i], |id| (id == 1).then_some(k)).is_err());
    }
}

#[test]
fn a_gate_key_does_not_sign_for_the_station() {
    let gate_key = SigningKey::from_bytes(&[9; 32]);
    let payload = seal(TOPIC, &command(5), GATE_KEY_ID, &gate_key);
    let station = key().verifying_key();
    assert_eq!(
        open::<Command>(TOPIC, &payload, |id| (id == 1).then_some(station)).unwrap_err().code(),
        "unknown_key"
    );
}
