//! Shared subscriptions (`$share/{name}/{filter}`, MQTT 5 section 4.8.2): every message
//! matching a group's filter goes to one of its members, in turn.
//!
//! A group is (share name, filter). Its first member starts one dispatcher task with one hub
//! pattern feed for the filter; the task hands each message to the next member (round robin)
//! whose key may read the message's channel and whose queue has room, or waits for the next
//! eligible member's queue when all are full. The last member to leave ends the task (and its
//! feed). Members are connections, each with one queue for all its shared subscriptions.
//!
//! # Invariants
//! - A message goes to at most one member of a group, never to a member whose key may not
//!   read its channel.
//! - A membership is left when its [`Membership`] is dropped (UNSUBSCRIBE, the connection's
//!   end, or its task being aborted).
//!
//! # Limits
//! A delivery a member received but did not complete when its connection ends is not handed
//! to another member (also not for persistent sessions); the group's position is live only:
//! messages published while a group has no member are not delivered to it later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use herald_core::ChannelName;
use herald_mqtt::topic::TopicFilter;
use tokio::sync::mpsc;

use crate::auth::{Authenticator, Operation, Principal};
use crate::hub::{ChannelMatcher, Hub, LiveMessage};

/// A message for one of a connection's shared subscriptions, by its full text.
pub type SharedDelivery = (String, Arc<LiveMessage>);

type GroupKey = (String, String);

struct Member {
    id: u64,
    /// The subscription's full text at the member (`$share/name/filter`).
    key: String,
    principal: Principal,
    sender: mpsc::Sender<SharedDelivery>,
}

struct Group {
    members: Vec<Member>,
    /// Where the next round-robin pick starts.
    next: usize,
    dispatcher: tokio::task::JoinHandle<()>,
}

/// Every shared subscription group of the server.
pub struct SharedGroups {
    groups: Mutex<HashMap<GroupKey, Group>>,
    member_ids: AtomicU64,
    hub: Arc<Hub>,
    auth: Arc<Authenticator>,
    queue_messages: usize,
}

/// One connection's place in a group; leaves the group when dropped.
pub struct Membership {
    groups: Weak<SharedGroups>,
    key: GroupKey,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(groups) = self.groups.upgrade() {
            groups.leave(&self.key, self.id);
        }
    }
}

impl SharedGroups {
    /// `queue_messages`: the capacity of each group's hub feed.
    pub fn new(hub: Arc<Hub>, auth: Arc<Authenticator>, queue_messages: usize) -> Self {
        Self {
            groups: Mutex::new(HashMap::new()),
            member_ids: AtomicU64::new(0),
            hub,
            auth,
            queue_messages,
        }
    }

    /// Groups with at least one member.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Group>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a member to the group (`share`, `filter`), starting the group if it is new.
    pub fn join(
        self: &Arc<Self>,
        share: &str,
        filter: TopicFilter,
        key: String,
        principal: Principal,
        sender: mpsc::Sender<SharedDelivery>,
    ) -> Membership {
        let group_key = (share.to_owned(), filter.as_str().to_owned());
        let id = self.member_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let member = Member {
            id,
            key,
            principal,
            sender,
        };
        let mut groups = self.lock();
        match groups.get_mut(&group_key) {
            Some(group) => group.members.push(member),
            None => {
                let matcher_filter = filter.clone();
                let matcher: ChannelMatcher =
                    Arc::new(move |channel: &ChannelName| matcher_filter.matches_channel(channel));
                let feed = self.hub.subscribe_matching(matcher, self.queue_messages);
                let dispatcher =
                    tokio::spawn(dispatch(Arc::downgrade(self), group_key.clone(), feed));
                groups.insert(
                    group_key.clone(),
                    Group {
                        members: vec![member],
                        next: 0,
                        dispatcher,
                    },
                );
            }
        }
        Membership {
            groups: Arc::downgrade(self),
            key: group_key,
            id,
        }
    }

    fn leave(&self, key: &GroupKey, id: u64) {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(key) else {
            return;
        };
        group.members.retain(|member| member.id != id);
        if group.members.is_empty() {
            let group = groups.remove(key).expect("present");
            group.dispatcher.abort();
        }
    }

    /// The member to hand a message of `channel` to: the next one in turn whose key may read
    /// the channel and whose queue has room (then it is sent here and `None` returned), or,
    /// when all such queues are full, the first such member's queue to wait on.
    fn offer(
        &self,
        key: &GroupKey,
        message: &Arc<LiveMessage>,
    ) -> Option<(String, mpsc::Sender<SharedDelivery>)> {
        let mut groups = self.lock();
        let group = groups.get_mut(key)?;
        let count = group.members.len();
        let mut fallback = None;
        for step in 0..count {
            let index = (group.next + step) % count;
            let member = &group.members[index];
            let readable = self
                .auth
                .authorize(
                    member.principal,
                    &message.message.channel,
                    Operation::Subscribe,
                )
                .is_ok();
            if !readable {
                continue;
            }
            match member
                .sender
                .try_send((member.key.clone(), message.clone()))
            {
                Ok(()) => {
                    group.next = (index + 1) % count;
                    return None;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if fallback.is_none() {
                        group.next = (index + 1) % count;
                        fallback = Some((member.key.clone(), member.sender.clone()));
                    }
                }
                // The member's connection is ending; its membership goes with it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        fallback
    }
}

/// A group's dispatcher: its feed's messages, each to one member.
async fn dispatch(
    groups: Weak<SharedGroups>,
    key: GroupKey,
    mut feed: crate::hub::PatternReceiver,
) {
    while let Some(message) = feed.receiver().recv().await {
        let Some(groups) = groups.upgrade() else {
            return;
        };
        if let Some((member_key, sender)) = groups.offer(&key, &message) {
            drop(groups);
            // Every eligible member is full: wait for the one whose turn it is. A member
            // that stopped reading is closed by its own send timeout, which ends this wait.
            let _ = sender.send((member_key, message)).await;
        }
    }
}
