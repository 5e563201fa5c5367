--[[
add-buffer.lua: merge subsegments (spans of one project and trace that share a parent) into
the segments they belong to, and return where each went.

The payload bytes are not touched here: the client has already written them (SADD) to each
subsegment's payload key `span-buf:s:{<pt>:<salt>}:<salt>`. This script only maintains the
segment bookkeeping, so it stays atomic within the `{<pt>}` cluster slot.

One call carries the subsegment records of one trace (one key), or of several traces (one
key each, all in the same cluster slot; on a standalone server, any traces), so a batch costs a
few calls instead of one per trace. A call with one key and one record is exactly Sentry's
9-argument call. Each trace's records are applied in order with Sentry's per-subsegment
algorithm; its reads are gathered up front (HMGET, MGET) and its writes applied once at the
end, because each redis.call costs microseconds of the shard's single thread.

Two checks Sentry's script does not make keep `ic` equal to what a flush can load, with the
same keys (see docs/decisions.md): a subsegment whose salt is already counted (a retried or
replayed batch) is not counted again, and a child segment whose flush lock is held is not
merged into its parent while it is being flushed.

The shard spends as much time in Lua as in commands, so the code avoids what Redis' Lua makes
expensive (measured in instructions per operation): tables and closures created per record or
per span, `ipairs`, global lookups, `tonumber` and number-to-string conversions (numbers passed
to redis.call are formatted with "%.17g"). State is kept in tables keyed by span id or salt;
a key string is built only when a command needs it, by appending the id to a prefix built once
per trace. Numeric fields that are only passed on (the TTL) stay strings.

KEYS      pt = "<project_id>:<trace_id>", one per trace; every key the script touches carries
          the hash tag "{<pt>}" of one of them, either directly or inside an embedded segment
          key.
ARGV      with one key: its records, to the end. With n > 1 keys: first n record counts (the
          records of KEYS[1], of KEYS[2], ...), then the records, grouped by key in that order.
          A record is 9 fields followed by the record's span ids:
  1 num_spans            integer, spans in this subsegment
  2 parent_span_id       common parent of the subsegment (the root's own id if present)
  3 has_root_span        "true" | "false"
  4 set_timeout          integer seconds; TTL (re)set on every key written
  5 byte_count           integer, sum of the uncompressed payload lengths
  6 max_segment_bytes    integer, 0 = unlimited; over it the subsegment detaches
  7 salt                 32 hex chars, names the payload key; detached segments use it
  8 check_flush_lock     "true" | "false"; detach when the target is being flushed
  9 metrics_sample_rate  integer N: metrics are gathered for about 1 call in N
  10.. span ids (num_spans of them)

RETURNS   six values per record, concatenated in ARGV order:
          { segment_key,             "span-buf:s:{<pt>}:<root span id or salt>"
            has_root_span,           1 or nil
            latency_us,              total microseconds of the trace's part of the call, on
                                     its first record when sampled, else -1
            latency_table,           flat { name, value, ... } (a trace's first record, when
                                     sampled)
            metrics_table,           flat { name, value, ... } ({} when not sampled)
            merged_segment_span_ids  span ids whose own segment was merged into this one }

Key shapes must match spans-pipeline/src/buffer/keys.rs.
]]

local call = redis.call
local tonumber = tonumber
local unpack = unpack
local format = string.format
local min = math.min
local argv = ARGV

-- Lua's unpack() fails beyond a few thousand values, so variadic commands are chunked.
local CHUNK = 1000
-- Redirect chains are short in practice (depth 2); the bound keeps a corrupt map from looping.
local MAX_REDIRECT_DEPTH = 100
-- SSCAN page size when moving one member-keys index into another.
local MERGE_PAGE = "1000"
local RECORD_FIELDS = 9
local EMPTY = {}

-- Every key is one of these prefixes followed by a span id or a salt:
-- `span-buf:s:{<pt>}:<id>` (segment key), `span-buf:mk:{<pt>}:<id>` (member keys) and
-- `span-buf:<ic|ibc|hrs|fl>:<segment key>`.
local function now_us()
    local t = call("TIME")
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local argc = #argv

-- Applies the records of one trace, `pt`, starting at ARGV[position]: `count` records, or
-- every record up to the end of ARGV when `count` is nil. Appends six reply values per record
-- to `reply`; returns the position after the group's last record, or nil and an error.
local function apply_group(pt, position, count, reply)
    local tag = "{" .. pt .. "}"
    local redirect_key = "span-buf:ssr:" .. tag
    local segment_prefix = "span-buf:s:" .. tag .. ":"
    local member_keys_prefix = "span-buf:mk:" .. tag .. ":"
    local count_prefix = "span-buf:ic:" .. segment_prefix
    local bytes_prefix = "span-buf:ibc:" .. segment_prefix
    local root_flag_prefix = "span-buf:hrs:" .. segment_prefix
    local lock_prefix = "span-buf:fl:" .. segment_prefix

    -- Parse the group's records: the ARGV position and span count of each. Each consumes 9
    -- fields plus its span ids, so the loop is bounded by #ARGV.
    local starts = {}
    local sizes = {}
    local records = 0
    while position <= argc and (count == nil or records < count) do
        local num_spans = tonumber(argv[position])
        if num_spans == nil or num_spans < 0 or position + RECORD_FIELDS - 1 + num_spans > argc then
            return nil, "malformed subsegment record at argument " .. position
        end
        records = records + 1
        starts[records] = position
        sizes[records] = num_spans
        position = position + RECORD_FIELDS + num_spans
    end
    if records == 0 then
        return position
    end

    -- Sampling without a TIME call: the salt is a hash, so its first digits are uniform. A salt
    -- that is not hex (direct script tests) is sampled only when the rate is 1.
    local metrics_sample_rate = tonumber(argv[starts[1] + RECORD_FIELDS - 1]) or 1
    local sampled = metrics_sample_rate <= 1
    if not sampled then
        local prefix = tonumber(string.sub(argv[starts[1] + 6], 1, 8), 16)
        sampled = prefix ~= nil and prefix % metrics_sample_rate == 0
    end
    local start_us = 0
    if sampled then
        start_us = now_us()
    end

    -- The redirect fields to write, as HSET's field/value pairs, in record order. A span id
    -- listed twice (by two records) is written twice; the later pair wins.
    local redirect_fields = {}
    local fields = 0

    -- Redirects of the parents and of the ids met while following chains (false = absent), kept
    -- up to date with this call's writes: a record sees the redirects of the records before it.
    -- Other span ids are not tracked; a chain that reaches one looks in this call's writes first.
    local redirects = {}
    local parents = {}
    for r = 1, records do
        local parent = argv[starts[r] + 1]
        if redirects[parent] == nil then
            redirects[parent] = false
            parents[#parents + 1] = parent
        end
    end
    for first = 1, #parents, CHUNK do
        local last = min(first + CHUNK - 1, #parents)
        local values = call("HMGET", redirect_key, unpack(parents, first, last))
        for i = first, last do
            redirects[parents[i]] = values[i - first + 1]
        end
    end
    local function redirect_of(span_id)
        local target = redirects[span_id]
        if target == nil then
            for i = fields - 1, 1, -2 do
                if redirect_fields[i] == span_id then
                    target = redirect_fields[i + 1]
                    break
                end
            end
            if target == nil then
                target = call("HGET", redirect_key, span_id)
            end
            redirects[span_id] = target
        end
        return target
    end

    -- Counters, root flags and locks of segment roots and detach targets by id: nil = not read,
    -- false = absent, else the value; updated as records are applied. A child span (a span other
    -- than the record's parent and root) that is not in `counts` has its counter read from the
    -- MGET reply by position: each record's children come after its root's keys.
    local counts = {}
    local bytes = {}
    local root_flags = {}
    local locks = {}
    local lookup_keys = {}
    local lookups = 0
    local root_lookups = {}
    local salt_lookups = {}
    local child_lookups = {}
    local roots = {}
    local depths = {}
    for r = 1, records do
        local start = starts[r]
        local parent = argv[start + 1]
        local root = parent
        local depth = 0
        for step = 1, MAX_REDIRECT_DEPTH do
            local next_id = redirect_of(root)
            if not next_id or next_id == root then
                break
            end
            root = next_id
            depth = step
        end
        roots[r] = root
        depths[r] = depth
        if counts[root] == nil then
            counts[root] = false
            bytes[root] = false
            root_flags[root] = false
            root_lookups[r] = lookups + 1
            lookup_keys[lookups + 1] = count_prefix .. root
            lookup_keys[lookups + 2] = bytes_prefix .. root
            lookup_keys[lookups + 3] = root_flag_prefix .. root
            lookups = lookups + 3
        end
        if locks[root] == nil and argv[start + 7] == "true" then
            locks[root] = false
            lookups = lookups + 1
            lookup_keys[lookups] = lock_prefix .. root
            locks[root] = lookups
        end
        -- The counter of the segment the salt names: it exists only if this very subsegment
        -- was written before and detached (a retry or a replay), see "already counted" below.
        lookups = lookups + 1
        lookup_keys[lookups] = count_prefix .. argv[start + 6]
        salt_lookups[r] = lookups
        -- Point every span of the subsegment at the (pre-detach) segment root.
        child_lookups[r] = lookups + 1
        for i = start + RECORD_FIELDS, start + RECORD_FIELDS - 1 + sizes[r] do
            local span_id = argv[i]
            if redirects[span_id] ~= nil then
                redirects[span_id] = root
            end
            redirect_fields[fields + 1] = span_id
            redirect_fields[fields + 2] = root
            fields = fields + 2
            if span_id ~= parent and span_id ~= root then
                lookups = lookups + 1
                lookup_keys[lookups] = count_prefix .. span_id
            end
        end
    end
    local redirect_done_us = 0
    if sampled then
        redirect_done_us = now_us()
    end

    -- One MGET (per chunk) of every counter, flag and lock.
    local values = {}
    for first = 1, lookups, CHUNK do
        local last = min(first + CHUNK - 1, lookups)
        local page = call("MGET", unpack(lookup_keys, first, last))
        if first == 1 then
            values = page
        else
            for i = first, last do
                values[i] = page[i - first + 1]
            end
        end
    end
    for r = 1, records do
        local index = root_lookups[r]
        if index ~= nil then
            local root = roots[r]
            counts[root] = values[index]
            bytes[root] = values[index + 1]
            root_flags[root] = values[index + 2]
        end
    end
    for root, index in pairs(locks) do
        locks[root] = values[index]
    end
    for r = 1, records do
        local salt = argv[starts[r] + 6]
        if counts[salt] == nil then
            counts[salt] = values[salt_lookups[r]] or false
        end
    end

    -- The byte counters of the children that turned out to be segment roots, and (with flush
    -- locks on) their locks: a child segment being flushed is not merged (see below). A byte
    -- counter is written and deleted with its span counter, so a span without one has none
    -- either. Only calls that merge read these.
    local child_keys = {}
    local child_ids = {}
    local child_into = {}
    for r = 1, records do
        local start = starts[r]
        local parent = argv[start + 1]
        local root = roots[r]
        local check_lock = argv[start + 7] == "true"
        local index = child_lookups[r]
        for i = start + RECORD_FIELDS, start + RECORD_FIELDS - 1 + sizes[r] do
            local child = argv[i]
            if child ~= parent and child ~= root then
                if values[index] then
                    if counts[child] == nil and bytes[child] == nil then
                        bytes[child] = false
                        child_ids[#child_ids + 1] = child
                        child_into[#child_ids] = bytes
                        child_keys[#child_ids] = bytes_prefix .. child
                    end
                    if check_lock and locks[child] == nil then
                        locks[child] = false
                        child_ids[#child_ids + 1] = child
                        child_into[#child_ids] = locks
                        child_keys[#child_ids] = lock_prefix .. child
                    end
                end
                index = index + 1
            end
        end
    end
    for first = 1, #child_keys, CHUNK do
        local last = min(first + CHUNK - 1, #child_keys)
        local page = call("MGET", unpack(child_keys, first, last))
        for i = first, last do
            child_into[i][child_ids[i]] = page[i - first + 1]
        end
    end

    -- Keys to write at the end, in first-written order, with their TTL: counters and root flags.
    -- A false value means "delete".
    local written_counts = {}
    local count_ttls = {}
    local written_bytes = {}
    local byte_ttls = {}
    local written_flags = {}
    local flag_ttls = {}

    -- Salts to add per member-keys index, in first-seen order.
    local pending_salts = {}
    local pending_order = {}
    local pending_ttl = {}

    -- Span ids whose member-keys index was merged away; deleted with the other keys at the end.
    local removed_member_keys = {}

    local merge_start_us = 0
    if sampled then
        merge_start_us = now_us()
    end
    local reply_base = #reply
    local too_large_of = {}
    local locked_of = {}
    local already_counted_of = {}
    -- Segment each salt of this call went to, and the member-keys indexes the common path
    -- already added its salt to (they still need their TTL).
    local seen = {}
    local listed_in = {}
    for r = 1, records do
        local start = starts[r]
        local parent = argv[start + 1]
        local ttl = argv[start + 3]
        local root = roots[r]
        local last_span = start + RECORD_FIELDS - 1 + sizes[r]

        -- Remember that the segment has seen its root (before any detach decision, like Sentry).
        local has_root_span = argv[start + 2] == "true" or root_flags[root] == "1"
        if has_root_span then
            root_flags[root] = "1"
            if flag_ttls[root] == nil then
                written_flags[#written_flags + 1] = root
            end
            flag_ttls[root] = ttl
        end

        -- Children that were segment roots bring their bytes (and below, everything else). The
        -- counter of a child is its state in this call if it has one, else what Redis holds.
        local byte_count = argv[start + 4] + 0
        local merging = nil
        local index = child_lookups[r]
        for i = start + RECORD_FIELDS, last_span do
            local child = argv[i]
            if child ~= parent and child ~= root then
                local child_count = counts[child]
                if child_count == nil then
                    child_count = values[index]
                    if child_count then
                        counts[child] = child_count
                    end
                end
                -- A child segment that is being flushed stays as it is: its flush produces its
                -- spans and its cleanup deletes its keys, so merging it would count its spans
                -- in this segment, which could not load them.
                if child_count and not locks[child] then
                    byte_count = byte_count + (bytes[child] or 0)
                    if merging == nil then
                        merging = { child }
                    else
                        merging[#merging + 1] = child
                    end
                end
                index = index + 1
            end
        end
        -- Detach into a segment of its own when the target is too big or is being flushed. No
        -- payload moves: the payload key is already named by the salt.
        local salt = argv[start + 6]
        local max_segment_bytes = argv[start + 5] + 0
        local too_large = max_segment_bytes > 0 and (bytes[root] or 0) + byte_count > max_segment_bytes
        local locked = argv[start + 7] == "true" and locks[root] ~= false

        -- Already counted: a subsegment written before (a retried batch, or the same batch read
        -- again) comes with the same salt. It is then a detached segment of its own (the salt's
        -- counter exists) or listed in its segment's member keys. Counting it again would make
        -- `ic` exceed what the segment can load, a loss that never happened. On the common path
        -- the SADD of the salt is the check; it replaces the SADD at the end.
        local counted_in = seen[salt]
        local listed = false
        if counted_in == nil then
            if counts[salt] then
                counted_in = salt
            elseif counts[root] then
                if too_large or locked then
                    if call("SISMEMBER", member_keys_prefix .. root, salt) == 1 then
                        counted_in = root
                    end
                elseif call("SADD", member_keys_prefix .. root, salt) == 0 then
                    counted_in = root
                else
                    listed = true
                end
            end
        end
        local target = root
        if counted_in ~= nil then
            target = counted_in
            too_large = false
            locked = false
        elseif too_large or locked then
            -- The salt's counter was read above and is absent, so its byte counter is too.
            target = salt
            bytes[target] = false
        end
        too_large_of[r] = too_large
        locked_of[r] = locked
        already_counted_of[r] = counted_in ~= nil
        seen[salt] = target
        local merged = EMPTY
        if counted_in == nil then
            local span_count = (counts[target] or 0) + sizes[r]

            -- Merge the segments of former roots into this one: counters, then their member-keys
            -- index (paged with SSCAN rather than SUNIONSTORE, because the target can be huge).
            local salts = pending_salts[target]
            if salts == nil then
                salts = {}
                pending_salts[target] = salts
                pending_order[#pending_order + 1] = target
            end
            pending_ttl[target] = ttl
            if merging ~= nil then
                merged = {}
                for m = 1, #merging do
                    local child = merging[m]
                    local child_count = counts[child]
                    -- A span listed twice is merged once.
                    if child_count then
                        span_count = span_count + child_count
                        counts[child] = false
                        if count_ttls[child] == nil then
                            written_counts[#written_counts + 1] = child
                        end
                        count_ttls[child] = ttl
                        if bytes[child] then
                            bytes[child] = false
                            if byte_ttls[child] == nil then
                                written_bytes[#written_bytes + 1] = child
                            end
                            byte_ttls[child] = ttl
                        end
                        -- Its salts join this segment's pending SADD; its index is deleted at the end.
                        local key = member_keys_prefix .. child
                        local cursor = "0"
                        repeat
                            local page = call("SSCAN", key, cursor, "COUNT", MERGE_PAGE)
                            cursor = page[1]
                            local members = page[2]
                            local n = #salts
                            for j = 1, #members do
                                salts[n + j] = members[j]
                            end
                        until cursor == "0"
                        removed_member_keys[#removed_member_keys + 1] = child
                        local child_salts = pending_salts[child]
                        if child_salts ~= nil and child_salts ~= salts then
                            local n = #salts
                            for j = 1, #child_salts do
                                salts[n + j] = child_salts[j]
                            end
                            pending_salts[child] = {}
                        end
                        merged[#merged + 1] = child
                    end
                end
            end

            if listed then
                listed_in[target] = true
            else
                salts[#salts + 1] = salt
            end
            counts[target] = span_count
            if count_ttls[target] == nil then
                written_counts[#written_counts + 1] = target
            end
            count_ttls[target] = ttl
            bytes[target] = (bytes[target] or 0) + byte_count
            if byte_ttls[target] == nil then
                written_bytes[#written_bytes + 1] = target
            end
            byte_ttls[target] = ttl
        end

        local base = reply_base + (r - 1) * 6
        reply[base + 1] = segment_prefix .. target
        reply[base + 2] = has_root_span
        reply[base + 3] = -1
        reply[base + 4] = EMPTY
        reply[base + 5] = EMPTY
        reply[base + 6] = merged
    end

    -- Apply the writes: redirects, counters and flags, member-keys indexes.
    if fields > 0 then
        for first = 1, fields, 2 * CHUNK do
            call("HSET", redirect_key, unpack(redirect_fields, first, min(first + 2 * CHUNK - 1, fields)))
        end
        call("EXPIRE", redirect_key, argv[starts[records] + 3])
    end
    local deleted = {}
    for i = 1, #removed_member_keys do
        local span_id = removed_member_keys[i]
        local salts = pending_salts[span_id]
        if salts == nil or #salts == 0 then
            deleted[#deleted + 1] = member_keys_prefix .. span_id
        end
    end
    local function write(values, ids, ttls, prefix)
        for i = 1, #ids do
            local id = ids[i]
            local value = values[id]
            if value then
                if type(value) == "number" then
                    value = format("%d", value)
                end
                call("SET", prefix .. id, value, "EX", ttls[id])
            else
                deleted[#deleted + 1] = prefix .. id
            end
        end
    end
    write(root_flags, written_flags, flag_ttls, root_flag_prefix)
    write(counts, written_counts, count_ttls, count_prefix)
    write(bytes, written_bytes, byte_ttls, bytes_prefix)
    for first = 1, #deleted, CHUNK do
        call("DEL", unpack(deleted, first, min(first + CHUNK - 1, #deleted)))
    end
    for i = 1, #pending_order do
        local span_id = pending_order[i]
        local salts = pending_salts[span_id]
        local key = member_keys_prefix .. span_id
        if #salts > 0 then
            for first = 1, #salts, CHUNK do
                call("SADD", key, unpack(salts, first, min(first + CHUNK - 1, #salts)))
            end
        end
        if #salts > 0 or listed_in[span_id] then
            call("EXPIRE", key, pending_ttl[span_id])
        end
    end

    if sampled then
        local end_us = now_us()
        local table_size = call("HLEN", redirect_key)
        for r = 1, records do
            local base = reply_base + (r - 1) * 6
            if r == 1 then
                reply[base + 3] = end_us - start_us
                reply[base + 4] = {
                    "redirect_step_latency_us", redirect_done_us - start_us,
                    "merge_payload_keys_step_latency_us", end_us - merge_start_us,
                    "counter_merge_step_latency_us", merge_start_us - redirect_done_us,
                    "total_step_latency_us", end_us - start_us,
                }
            end
            reply[base + 5] = {
                "redirect_table_size", table_size,
                "redirect_depth", depths[r],
                "detached_segment_too_large", too_large_of[r] and 1 or 0,
                "detached_segment_locked", locked_of[r] and 1 or 0,
                "already_counted", already_counted_of[r] and 1 or 0,
                "span_count", sizes[r],
            }
        end
    end
    return position
end

local reply = {}
local groups = #KEYS
local position = 1
if groups == 1 then
    local err
    position, err = apply_group(KEYS[1], 1, nil, reply)
    if position == nil then
        return redis.error_reply(err)
    end
else
    position = groups + 1
    for g = 1, groups do
        local count = tonumber(argv[g])
        if count == nil or count < 0 then
            return redis.error_reply("malformed record count of key " .. g)
        end
        local err
        position, err = apply_group(KEYS[g], position, count, reply)
        if position == nil then
            return redis.error_reply(err)
        end
    end
    if position ~= argc + 1 then
        return redis.error_reply("malformed call: " .. (argc + 1 - position) .. " arguments after the last record")
    end
end
return reply
