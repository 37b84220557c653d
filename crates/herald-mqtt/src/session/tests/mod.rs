//! Unit tests of [`Session`]: every flow, driven by hand as the server's driver would. This
//! file holds the shared helpers (sessions past CONNACK, packets, what the session sent) and
//! the tests of the endings in `session/mod.rs`; each flow's tests are in the file named
//! like the flow's module.

mod aliases;
mod connect;
mod inbound;
mod model;
mod outbound;
mod persistent;
mod reasons;
mod retained;
mod subscriptions;

use std::collections::BTreeMap;
use std::num::NonZeroU16;

use bytes::Bytes;
use herald_core::{
    ChainHash, ChannelName, Data, Epoch, Message, MessageId, Position, Serial, Timestamp,
};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v3;
use rmqtt_codec::v5::{self, DisconnectReasonCode};

use super::*;

fn id(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn drain(session: &mut Session) -> Vec<Action> {
    std::iter::from_fn(|| session.poll_action()).collect()
}

fn config() -> SessionConfig {
    SessionConfig {
        receive_maximum: 2,
        outbound_inflight_max: 64,
        outbound_pending_max: 2,
        keep_alive_max_secs: 60,
        max_packet_bytes: 4096,
        subscriptions_max: 3,
        topic_alias_maximum: 2,
        session_expiry_max_secs: 3600,
        outbound_topic_alias_maximum: 3,
    }
}

/// A fresh session (the test config, connection id `c1`) that has received a v3 `connect`.
fn v3_connecting(connect: v3::Connect) -> Session {
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V3(v3::Packet::Connect(Box::new(connect))));
    session
}

/// [`v3_connecting`] for v5.
fn v5_connecting(connect: v5::Connect) -> Session {
    let mut session = Session::new(config(), "c1");
    session.handle_packet(Packet::V5(v5::Packet::Connect(Box::new(connect))));
    session
}

/// Answers the session's only action, [`Action::Authenticate`], with success, and the
/// [`Action::OpenSession`] that follows with no stored session; returns what followed (the
/// CONNACK first).
fn authenticate(session: &mut Session) -> Vec<Action> {
    assert!(matches!(drain(session)[..], [Action::Authenticate { .. }]));
    session.handle_authenticated(Ok(()));
    let opening = drain(session);
    assert!(
        matches!(opening[..], [Action::OpenSession { .. }]),
        "{opening:?}"
    );
    session.handle_session_opened(Ok(None));
    drain(session)
}

/// A v3 session past CONNACK.
fn v3_session() -> Session {
    let mut session = v3_connecting(v3::Connect {
        clean_session: true,
        keep_alive: 30,
        client_id: "dev-1".into(),
        ..v3::Connect::default()
    });
    assert!(matches!(
        &authenticate(&mut session)[..],
        [Action::Send(Packet::V3(v3::Packet::ConnectAck(
            v3::ConnectAck {
                return_code: v3::ConnectAckReason::ConnectionAccepted,
                session_present: false,
            }
        )))]
    ));
    session
}

/// A v5 session past CONNACK, and its CONNACK.
fn v5_connect(connect: v5::Connect) -> (Session, Box<v5::ConnectAck>) {
    let mut session = v5_connecting(connect);
    let mut actions = authenticate(&mut session);
    assert_eq!(actions.len(), 1);
    let Action::Send(Packet::V5(v5::Packet::ConnectAck(connack))) = actions.remove(0) else {
        panic!("a CONNACK")
    };
    (session, connack)
}

fn v5_session(client_receive_maximum: u16) -> Session {
    v5_connect(v5::Connect {
        clean_start: true,
        keep_alive: 30,
        client_id: "dev-1".into(),
        receive_max: NonZeroU16::new(client_receive_maximum),
        ..v5::Connect::default()
    })
    .0
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, dup: bool) -> Publish {
    Publish {
        dup,
        retain: false,
        qos,
        topic: topic.to_owned().into(),
        packet_id: packet_id.map(id),
        payload: Bytes::from_static(b"payload"),
        properties: None,
    }
}

fn message(channel: &str, serial: u64, qos_header: Option<&str>, id: &str) -> Message {
    let epoch = Epoch::parse("E1").unwrap();
    let mut headers = BTreeMap::new();
    if let Some(qos) = qos_header {
        headers.insert(HEADER_QOS.to_owned(), qos.to_owned());
    }
    Message {
        channel: ChannelName::parse(channel).unwrap(),
        epoch: epoch.clone(),
        serial: Serial(serial),
        id: MessageId::parse(id).unwrap(),
        time: Timestamp(1),
        name: None,
        headers,
        data: Data::Binary(Bytes::from_static(b"hi")),
        ttl_ms: None,
        chain: ChainHash::genesis(&epoch),
    }
}

/// Subscribes (v3 or v5 by the session's version) and grants every filter.
fn subscribe(session: &mut Session, packet_id: u16, filters: &[(&str, QoS)]) -> Vec<Action> {
    let packet = match session.version() {
        Version::V3 => Packet::V3(v3::Packet::Subscribe {
            packet_id: id(packet_id),
            topic_filters: filters
                .iter()
                .map(|(filter, qos)| ((*filter).to_owned().into(), *qos))
                .collect(),
        }),
        Version::V5 => {
            let filters: Vec<_> = filters
                .iter()
                .map(|(filter, qos)| (*filter, v5_options(*qos)))
                .collect();
            v5_subscribe_packet(packet_id, &filters)
        }
    };
    session.handle_packet(packet);
    let actions = drain(session);
    let [Action::AuthorizeSubscribe { filters, .. }] = &actions[..] else {
        panic!("an authorization request: {actions:?}")
    };
    let count = filters.len();
    session.handle_subscribe_authorized(id(packet_id), vec![true; count], 0);
    drain(session)
}

fn sent(actions: &[Action]) -> Vec<&Packet> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(packet) => Some(packet),
            _ => None,
        })
        .collect()
}

/// The PUBLISH packets the session sent, in order.
fn sent_publishes(actions: &[Action]) -> Vec<&Publish> {
    sent(actions)
        .into_iter()
        .filter_map(|packet| match packet {
            Packet::V3(v3::Packet::Publish(publish)) | Packet::V5(v5::Packet::Publish(publish)) => {
                Some(&**publish)
            }
            _ => None,
        })
        .collect()
}

fn closed_with(actions: &[Action]) -> Option<DisconnectReasonCode> {
    actions.iter().find_map(|action| match action {
        Action::Close(reason) => Some(reason.code),
        _ => None,
    })
}

fn v5_disconnect_code(actions: &[Action]) -> Option<DisconnectReasonCode> {
    actions.iter().find_map(|action| match action {
        Action::Send(Packet::V5(v5::Packet::Disconnect(disconnect))) => {
            Some(disconnect.reason_code)
        }
        _ => None,
    })
}

/// Subscribes a v5 session to `a/+` with `options` and grants it; returns what followed.
fn v5_subscribe_with(
    session: &mut Session,
    packet_id: u16,
    options: v5::SubscriptionOptions,
) -> Vec<Action> {
    session.handle_packet(v5_subscribe_packet(packet_id, &[("a/+", options)]));
    drain(session);
    session.handle_subscribe_authorized(id(packet_id), vec![true], 0);
    drain(session)
}

/// A PUBLISH packet of `version`.
fn publish_packet(version: Version, publish: Publish) -> Packet {
    match version {
        Version::V3 => Packet::V3(v3::Packet::Publish(Box::new(publish))),
        Version::V5 => Packet::V5(v5::Packet::Publish(Box::new(publish))),
    }
}

/// The client sends `publish` in the session's version.
fn client_publishes(session: &mut Session, publish: Publish) {
    session.handle_packet(publish_packet(session.version(), publish));
}

/// Subscription options asking for `qos`, the rest default.
fn v5_options(qos: QoS) -> v5::SubscriptionOptions {
    v5::SubscriptionOptions {
        qos,
        ..v5::SubscriptionOptions::default()
    }
}

/// A v5 SUBSCRIBE of `filters` with their options.
fn v5_subscribe_packet(packet_id: u16, filters: &[(&str, v5::SubscriptionOptions)]) -> Packet {
    Packet::V5(v5::Packet::Subscribe(v5::Subscribe {
        packet_id: id(packet_id),
        id: None,
        user_properties: Vec::new(),
        topic_filters: filters
            .iter()
            .map(|(filter, options)| ((*filter).to_owned().into(), *options))
            .collect(),
    }))
}

#[test]
fn decode_errors_keep_alive_and_shutdown_close_with_their_reason() {
    let closes_with = |end: &dyn Fn(&mut Session), code| {
        let mut session = v5_session(10);
        end(&mut session);
        assert_eq!(v5_disconnect_code(&drain(&mut session)), Some(code));
    };
    let too_large = DecodeError::MaxSizeExceeded { size: 10, max: 5 };
    closes_with(
        &|session| session.handle_decode_error(&too_large),
        DisconnectReasonCode::PacketTooLarge,
    );
    closes_with(
        &Session::handle_keep_alive_timeout,
        DisconnectReasonCode::KeepAliveTimeout,
    );
    closes_with(
        &Session::handle_shutdown,
        DisconnectReasonCode::ServerShuttingDown,
    );
}
