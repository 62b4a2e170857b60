-- The system of record for many hosts: accounts, keys (hashes only), usage, budget spend and the payment
-- ledger. Column meanings follow the records in cheapest/store/records.py and store/payments.py; nothing
-- here ever holds request or response text. Money is integer micro-dollars. Identifiers compare byte-wise
-- (COLLATE "C"), so listings and pages come in the same order as in the embedded LMDB store.

CREATE TABLE meta (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
-- epoch: bumped in the same transaction as any key or account change (workers' caches compare it).
INSERT INTO meta (name, value) VALUES ('epoch', 0);

CREATE TABLE accounts (
    id                  text COLLATE "C" PRIMARY KEY,
    email               text NOT NULL,
    email_key           text COLLATE "C" NOT NULL UNIQUE,  -- the email lower-cased: one account per address
    created_at          bigint NOT NULL,
    plan                text NOT NULL,
    status              text NOT NULL,
    subscription_status text NOT NULL,
    period_end          bigint,
    deleted_at          bigint
);

CREATE TABLE keys (
    id         text COLLATE "C" PRIMARY KEY,
    account_id text COLLATE "C" NOT NULL REFERENCES accounts (id),
    kind       text NOT NULL,
    hash       bytea NOT NULL UNIQUE,  -- HMAC(pepper, secret); the secret itself is never stored
    hint       text NOT NULL,
    name       text NOT NULL,
    created_at bigint NOT NULL,
    limits     jsonb NOT NULL,
    disabled   boolean NOT NULL,
    expires_at bigint,
    models     text[]
);
CREATE INDEX keys_by_account ON keys (account_id, id);

-- Every key an account ever had, revoked ones included: their usage is still the account's.
CREATE TABLE key_history (
    account_id text COLLATE "C" NOT NULL,
    key_id     text COLLATE "C" NOT NULL,
    PRIMARY KEY (account_id, key_id)
);

-- Per key, model and UTC hour; flushes add to it with INSERT ... ON CONFLICT DO UPDATE (x = x + excluded.x).
CREATE TABLE usage (
    key_id            text COLLATE "C" NOT NULL,
    hour              bigint NOT NULL,
    model             text COLLATE "C" NOT NULL,
    requests          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_micro        bigint NOT NULL,
    PRIMARY KEY (key_id, hour, model)
);
CREATE INDEX usage_by_hour ON usage (hour);

-- Anonymous per-day, per-model aggregates (usage older than 90 days, or of a purged account).
CREATE TABLE usage_daily (
    day               bigint NOT NULL,
    model             text COLLATE "C" NOT NULL,
    requests          bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_micro        bigint NOT NULL,
    PRIMARY KEY (day, model)
);

-- A key's spend in each budget window (all four lengths are kept), the current window of each only.
CREATE TABLE spend (
    key_id     text COLLATE "C" NOT NULL,
    window_len text COLLATE "C" NOT NULL,
    start      bigint NOT NULL,
    micro      bigint NOT NULL,
    PRIMARY KEY (key_id, window_len, start)
);

-- A worker's usage flush, applied once: a flush whose commit was lost with its connection is retried under
-- the same id, and the second try finds it here and changes nothing.
CREATE TABLE usage_flushes (
    id         uuid PRIMARY KEY,
    applied_at bigint NOT NULL
);

-- The payment ledger: each external event credited at most once, by its unique key.
CREATE TABLE pay_events (
    event_id    text COLLATE "C" PRIMARY KEY,  -- Stripe event id
    type        text NOT NULL,
    created     bigint NOT NULL,
    received_at bigint NOT NULL,
    account_id  text COLLATE "C"               -- NULL: no live account could be resolved (or it was purged since)
);

CREATE TABLE pay_chain_claims (
    chain_id     bigint NOT NULL,
    tx_hash      text COLLATE "C" NOT NULL,    -- lower-case 0x...
    log_index    bigint NOT NULL,
    account_id   text COLLATE "C" NOT NULL,    -- '' once the account is purged
    amount_units numeric NOT NULL,
    sender       text NOT NULL,    -- '' once the account is purged
    block_number bigint NOT NULL,
    claimed_at   bigint NOT NULL,
    PRIMARY KEY (chain_id, tx_hash, log_index)
);

CREATE TABLE pay_subscriptions (
    account_id text COLLATE "C" PRIMARY KEY,
    state      jsonb NOT NULL      -- SubscriptionState: last-writer-wins registers
);

CREATE TABLE pay_balances (
    account_id text COLLATE "C" PRIMARY KEY,
    micro      bigint NOT NULL     -- the ONE spendable balance; may go below zero (cost is known after use)
);

CREATE TABLE pay_journal (
    account_id   text COLLATE "C" NOT NULL,
    ref          text COLLATE "C" NOT NULL,
    kind         text NOT NULL,
    at           bigint NOT NULL,
    micro_usd    bigint NOT NULL,
    amount_minor bigint NOT NULL,
    currency     text NOT NULL,
    PRIMARY KEY (account_id, ref)
);

CREATE TABLE pay_links (
    provider_id text COLLATE "C" PRIMARY KEY,  -- Stripe customer / subscription id
    account_id  text COLLATE "C" NOT NULL
);
CREATE INDEX pay_links_by_account ON pay_links (account_id);
CREATE INDEX pay_events_by_account ON pay_events (account_id) WHERE account_id IS NOT NULL;
CREATE INDEX pay_chain_claims_by_account ON pay_chain_claims (account_id);
