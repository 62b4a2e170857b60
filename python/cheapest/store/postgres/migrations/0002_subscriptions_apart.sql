-- Each subscription keeps its own state (an account may hold several: a plan changed by buying another, an old
-- one winding down); the account's plan and standing are derived from all of them. A row of the first schema
-- holds an account's merged state: it keeps subscription_id '' and is folded into its subscription's own row
-- the next time that subscription changes.
ALTER TABLE pay_subscriptions ADD COLUMN subscription_id text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE pay_subscriptions DROP CONSTRAINT pay_subscriptions_pkey;
ALTER TABLE pay_subscriptions ADD PRIMARY KEY (account_id, subscription_id);
