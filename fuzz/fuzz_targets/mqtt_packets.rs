//! The MQTT packet path, as the server runs it: arbitrary bytes, arriving in chunks, through
//! the connection's `PacketDecoder` into a `Session`, whose actions are answered the way the
//! first input byte says (credentials accepted or not, subscriptions allowed or not, appends
//! durable or refused, appended messages delivered back). It must never panic, and must end
//! every run closed or waiting for input, never looping.

#![no_main]

use bytes::BytesMut;
use herald_core::{ChainHash, Epoch, Message, Serial, Timestamp};
use herald_mqtt::{Action, AppendOutcome, AuthRefusal, PacketDecoder, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

/// Actions answered per decoded packet, at most: a session that keeps asking is a bug.
const ACTIONS_PER_PACKET_MAX: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let Some((&answers, bytes)) = data.split_first() else {
        return;
    };
    let mut session = Session::new(SessionConfig::default(), "fuzz");
    let mut decoder = PacketDecoder::new(64 * 1024);
    let mut buffer = BytesMut::new();
    let mut serial = 0;
    for chunk in bytes.chunks(usize::from(answers % 31) + 1) {
        buffer.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buffer) {
                Ok(None) => break,
                Ok(Some(packet)) => session.handle_packet(packet),
                Err(error) => session.handle_decode_error(&error),
            }
            answer(&mut session, answers, &mut serial);
            if session.is_closed() {
                return;
            }
        }
    }
    session.handle_keep_alive_timeout();
    answer(&mut session, answers, &mut serial);
});

fn answer(session: &mut Session, answers: u8, serial: &mut u64) {
    for _ in 0..ACTIONS_PER_PACKET_MAX {
        let Some(action) = session.poll_action() else {
            return;
        };
        match action {
            Action::Authenticate { .. } => session.handle_authenticated(if answers & 1 == 0 {
                Ok(())
            } else {
                Err(AuthRefusal::BadCredentials)
            }),
            Action::AuthorizeSubscribe { packet_id, filters } => {
                let allowed = filters.iter().map(|_| answers & 2 == 0).collect();
                session.handle_subscribe_authorized(packet_id, allowed);
            }
            Action::Append {
                token,
                channel,
                message,
            } => {
                let outcome = if answers & 4 == 0 {
                    AppendOutcome::Durable
                } else {
                    AppendOutcome::Overloaded
                };
                session.handle_appended(token, outcome);
                if answers & 8 == 0 {
                    *serial += 1;
                    let epoch = Epoch::parse("fuzz").expect("a valid epoch");
                    session.handle_delivery(&Message {
                        channel,
                        chain: ChainHash::genesis(&epoch),
                        epoch,
                        serial: Serial(*serial),
                        id: message.id,
                        time: Timestamp(*serial),
                        name: message.name,
                        headers: message.headers,
                        data: message.data,
                        ttl_ms: message.ttl_ms,
                    });
                }
            }
            Action::Send(_)
            | Action::PublishWill(_)
            | Action::Subscribe { .. }
            | Action::Unsubscribe { .. }
            | Action::SendRetained { .. }
            | Action::Close(_) => {}
        }
    }
    panic!("the session asked for more than {ACTIONS_PER_PACKET_MAX} actions in a row");
}
