--[[
macao-ocr shared quota limiter: one atomic script, one round trip per call.
The same algorithm as worker/aimd.py (the in-memory twin runs that); read its docstring for
the reasoning. One contract suite (tests/unit/test_limiter_contract.py) holds both to it.

KEYS[1]  the state hash of one quota: worker.limiter.limiter_key(secret_id, action, endpoint)

ARGV[1]  operation:
           "reserve"    take the next slot if it is at most max_wait_s away
                        -> { granted (1|0), wait_s (string), slack_s (string), window (int),
                           window_cap (int) }; refused: nothing of the schedule is written,
                           window and window_cap are 0; wait_s is the time to the slot, or
                           for a newcomer (ARGV[15]) the time to its turn in the line.
                           slack_s = time from the slot to its window's end: how late the call may leave and still land in that window;
                           window = the slot's second, window_cap = that window's slots
           "throttled"  record a RequestLimitExceeded answer -> effective rate (string)
           "rate"       read only -> effective rate (string), or nil when the key has no state
                        ("rate" needs no other ARGV: it uses qps and inc stored in the hash)
ARGV[2]  qps                     configured calls per second (> 0; 0 = unlimited never gets here)
ARGV[3]  burst                   >= 1; burst-1 slots the current window let pass may be taken now
ARGV[4]  min_rate_fraction       the rate never steps below this × qps
ARGV[5]  decrease_factor         multiplicative step on a throttle (e.g. 0.9)
ARGV[6]  increase_fraction_per_s additive recovery, fraction of qps per second
ARGV[7]  coalesce_s              throttles within this of a decrease are the same event
ARGV[8]  probe_settle_s          a probe window's answers are in this long after it ends
ARGV[9]  probe_gap_min_s         spacing of probes after a passed one
ARGV[10] probe_gap_max_s         a failed probe doubles the spacing up to this
ARGV[11] lost_state_guard_s      how far ahead a lost state may have booked (the horizon)
ARGV[12] max_wait_s              ("reserve") refuse slots further away than this; unused by
                                 "throttled" (pass 0)
ARGV[13] window                  ("throttled") the throttled call's window, from its reserve
ARGV[14] window_cap              ("throttled") that window's slots; 0 = no evidence
ARGV[15] newcomer                ("reserve") 1: the caller has no place in the line yet. It
                                 is granted a slot only if one is within max_wait_s and the
                                 line does not reach past it; otherwise it joins the line:
                                 refused with wait_s = its turn (max(line_end, slot) - now)
                                 and line_end moves one slot (1 / effective rate) later. 0 (or
                                 absent): a holder of a place, or no line at all: the next
                                 free slot within max_wait_s, as before the line existed.
ARGV[16] edge_margin_s           ("reserve") least time from a window's last slot to its end;
                                 absent = 0 (slots evenly spread, as before it existed)

Clock: Redis TIME, so every host agrees on window edges whatever its own clock says.

Schedule (why): Tencent counts calls per fixed 1-second window at arrival. Window k gets
`cap` whole slots at k + (i + 0.5) * g: at the quota Q that is exactly Q calls per window.
g = min(1 / cap, (1 - edge_margin_s) / (cap - 0.5)) (aimd.slot_spacing_s): the middle of
each 1/cap interval, closed up where that would leave less than edge_margin_s after the
last slot. A schedule repeating every second keeps exactly Q calls in every server window
whatever the constant delay; only varying delay pushes a call over an edge, and only late,
into the next window: hence the wider margin at the end (aimd.py's docstring has the
figures). A fractional rate carries its fraction to later windows. burst > 1 only re-uses
slots the current window already let pass, so no window ever holds more than its cap
(tighter than Q + burst - 1), and never after the window's last slot, which keeps the
margin.

Adaptive rate (why): the quota is a whole number per window, so an adapted rate is used as
floor(rate) slots, and a window exceeds the cap known to pass (good_cap) only as a probe
(one whole window at good_cap + 1, adopted once that window was full and its answers came
back unthrottled); a failed probe costs one throttle and doubles the gap to the next. Other throttles step the rate down ×decrease_factor once per event (answers to calls
scheduled before the step, or within coalesce_s, are the same event); the rate then climbs
back by increase_fraction_per_s × qps per second, up to qps.

The line (why): slots are booked only a short horizon ahead (worker/quota/horizon.py), so
the schedule cannot tell a waiting job how many other jobs of the fleet wait before it.
line_end counts them as time: each newcomer that gets no slot is handed the line's end as
its turn and pushes it one slot later. The job waits for its turn (in process if near, else
deferred in SQL to just before it) and then asks as a holder (ARGV[15] = 0). Turns are
estimates, never slots: the schedule alone lets calls leave, so a wrong turn costs waiting,
never a throttle.

Evidence (why): the API accepts a window's first Q calls and throttles the rest, so n
throttles answered for calls of one window of window_cap slots prove Q <= window_cap - n:
good_cap drops to that bound at once (tally_win, tally_n count them).

State fields (seconds on the Redis clock): rate rate_ts hold_until win cap used carry
last_slot good_cap probe_cap probe_win probe_sent probe_next probe_gap_s tally_win tally_n
line_end, plus qps, inc and
settle (probe_settle_s) for "rate".
Times absent from a fresh state are -1 (before any Redis TIME), standing for "never".

A lost state (why): no state is either a key never used (or expired idle) or one Redis lost
(a restart without persistence, a FLUSHDB) while calls it scheduled, up to
lost_state_guard_s ahead, are still on their way. Handing their windows out again would
overfill them, and the throttles would teach a quota lower than the real one. So a fresh
state's first reservation stamps an empty window (win = floor(now + lost_state_guard_s),
cap 0): the first slot is in the window after it. The stamp is saved even when that
reservation is refused, or every retry would push it further. A state merely idle is not
gone: past its schedule and a full recovery (idle_at) it starts afresh without the guard,
and its key is kept a day longer, so the first call after an idle spell waits for nothing.
]]

local key = KEYS[1]
-- How long an idle state's key is kept after its idle_at (see save): a day.
local KEEP_IDLE_S = 86400
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local function fmt(x)
  return string.format('%.17g', x)
end

-- The state, or nil; and whether a state is there but idle (past idle_at: its schedule and
-- a full recovery are over), which starts afresh without the lost-state guard.
local function load()
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil, false
  end
  local s = {}
  for i = 1, #flat, 2 do
    s[flat[i]] = tonumber(flat[i + 1])
  end
  if s.idle_at ~= nil and now >= s.idle_at then
    return nil, true
  end
  return s, false
end

local function current_rate(s, qps, inc)
  local rate = s.rate
  if now > s.rate_ts then
    rate = rate + inc * (now - s.rate_ts)
  end
  return math.min(qps, s.good_cap + 1, rate)
end

-- When the answers to the (latest) probe window's calls are in.
local function answers_in(s, settle_s)
  return s.probe_win + 1 + settle_s
end

local function probe_passed(s, settle_s)
  return s.probe_cap > 0 and s.probe_sent >= s.probe_cap and now >= answers_in(s, settle_s)
end

local function effective_rate(s, qps, inc, settle_s)
  local good_cap = s.good_cap
  if probe_passed(s, settle_s) then
    good_cap = s.probe_cap -- adopted when the next window opens
  end
  return math.min(current_rate(s, qps, inc), good_cap)
end

if op == 'rate' then
  local s = load()
  if s == nil then
    return false
  end
  return fmt(effective_rate(s, s.qps, s.inc, s.settle))
end

local qps = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local rate_min = tonumber(ARGV[4]) * qps
local decrease_factor = tonumber(ARGV[5])
local inc = tonumber(ARGV[6]) * qps
local coalesce_s = tonumber(ARGV[7])
local probe_settle_s = tonumber(ARGV[8])
local probe_gap_min_s = tonumber(ARGV[9])
local probe_gap_max_s = tonumber(ARGV[10])
local lost_state_guard_s = tonumber(ARGV[11])

local s, idle = load()
if s ~= nil then
  -- State written by an older script has no tally or line yet.
  s.tally_win, s.tally_n = s.tally_win or -1, s.tally_n or 0
  s.line_end = s.line_end or -1
else
  s = {
    rate = qps, rate_ts = -1, hold_until = -1, win = -1, cap = 0, used = 0, carry = 0,
    last_slot = -1, good_cap = math.ceil(qps), probe_cap = 0, probe_win = -1,
    probe_sent = 0, probe_next = -1, probe_gap_s = probe_gap_min_s, tally_win = -1,
    tally_n = 0, line_end = -1,
  }
  if idle then
    -- Merely idle: nothing of it is booked any more, so no guard (a window already past).
    s.win = math.floor(now) - 1
  end
end

local function save()
  s.qps = qps
  s.inc = inc
  s.settle = probe_settle_s
  -- Outlive the committed schedule and a full recovery; an idle quota then starts afresh
  -- (idle_at). The key itself is kept KEEP_IDLE_S longer, so that a state that is not there
  -- at all is one Redis lost (or a key unused for that long): only then the guard.
  local idle_s = math.max(0, s.last_slot - now, s.line_end - now)
    + math.max(0, (qps - s.rate) / inc) + 60
  s.idle_at = now + idle_s
  local args = {}
  for field, value in pairs(s) do
    args[#args + 1] = field
    args[#args + 1] = fmt(value)
  end
  redis.call('HSET', key, unpack(args))
  redis.call('PEXPIRE', key, math.ceil((idle_s + KEEP_IDLE_S) * 1000))
end

-- Open window `win`: size it from the rate, then apply the probe rule.
local function open(rate, win)
  local cap, carry
  if rate >= 1 and rate < qps then
    -- An adapted rate estimates a whole-number quota: never round it up.
    cap, carry = math.floor(rate), s.carry
  else
    local total = rate + s.carry
    cap = math.floor(total)
    carry = total - cap
  end
  if s.probe_cap > 0 then
    if probe_passed(s, probe_settle_s) then
      -- Its window was full, its answers are in, and none was throttled.
      s.good_cap, s.probe_cap, s.probe_gap_s = s.probe_cap, 0, probe_gap_min_s
      s.probe_next = math.min(s.probe_next, s.probe_win + probe_gap_min_s)
    elseif win > s.probe_win and s.probe_sent < s.probe_cap then
      s.probe_cap = 0 -- the window was not filled: it proved nothing
    end
  end
  if cap > s.good_cap then
    -- A probe needs a whole window, none of it passed already.
    if s.probe_cap == 0 and win >= now and win >= s.probe_next
        and now >= answers_in(s, probe_settle_s) then
      cap = s.good_cap + 1
      s.probe_cap, s.probe_win, s.probe_sent = cap, win, 0
      s.probe_next = win + s.probe_gap_s
    else
      cap = s.good_cap
    end
    carry = 0
  end
  s.win, s.cap, s.used, s.carry = win, cap, 0, carry
end

if op == 'reserve' then
  local max_wait_s = tonumber(ARGV[12])
  local stamped = false
  if s.win < 0 and lost_state_guard_s > 0 then
    -- A fresh state: an empty window over whatever a lost state may have booked.
    s.win, s.cap, s.used = math.floor(now + lost_state_guard_s), 0, 0
    stamped = true
  end
  local newcomer = tonumber(ARGV[15] or '0') == 1
  -- A refusal writes nothing of the windows it looked ahead into (the stamp aside): keep
  -- what was read.
  local read = {}
  for field, value in pairs(s) do
    read[field] = value
  end
  local rate = current_rate(s, qps, inc)
  local k = math.floor(now)
  if s.win < k then
    open(rate, k)
  end
  local edge_margin_s = tonumber(ARGV[16] or '0')
  -- aimd.slot_spacing_s, the same expression (both twins must round alike).
  local function spacing(cap)
    return math.min(1.0 / cap, (1.0 - edge_margin_s) / (cap - 0.5))
  end
  local index
  local guard = 0
  while true do
    index = s.used
    if s.win == k and s.cap > 0 then
      local spacing_s = spacing(s.cap)
      local tolerance = 0
      if now - k <= (s.cap - 0.5) * spacing_s then
        tolerance = burst - 1
      end
      index = math.max(index, math.ceil((now - k) / spacing_s - 0.5 - tolerance))
    end
    if index < s.cap then
      break
    end
    guard = guard + 1
    if guard > 1000000 then
      return redis.error_reply('ratelimit: no slot within 1e6 windows')
    end
    open(rate, s.win + 1)
  end
  local send = math.max(s.win + (index + 0.5) * spacing(s.cap), now)
  local wait_s = send - now
  -- 0.001: aimd.LINE_TOLERANCE_S (a line ending this close to the slot ends at it).
  if newcomer and (wait_s > max_wait_s or s.line_end > send + 0.001) then
    -- No slot for it now: its turn is the line's end (or the slot, if the line is shorter).
    local turn = math.max(s.line_end, send)
    local spacing_s = 1 / math.max(math.min(rate, s.good_cap), rate_min)
    s = read
    s.line_end = turn + spacing_s
    save()
    return { 0, fmt(turn - now), '0', 0, 0 }
  end
  if wait_s > max_wait_s then
    if stamped then
      save()
    end
    return { 0, fmt(wait_s), '0', 0, 0 }
  end
  s.rate, s.rate_ts, s.used = rate, now, index + 1
  if s.probe_cap > 0 and s.win == s.probe_win then
    s.probe_sent = s.probe_sent + 1
  end
  s.last_slot = math.max(s.last_slot, send)
  save()
  return { 1, fmt(wait_s), fmt(s.win + 1 - send), s.win, s.cap }
end

-- One step down per over-quota event (or the probe's failure); false: same event, no change.
local function step_down()
  local rate = current_rate(s, qps, inc)
  local hold_until = math.max(now, s.last_slot) + coalesce_s
  if s.probe_cap > 0 then
    -- Blame the probe (one window one call over): back to the good cap, probe later.
    local gap_s = math.min(probe_gap_max_s, 2 * s.probe_gap_s)
    s.rate, s.rate_ts = s.good_cap, now
    s.hold_until = math.max(s.hold_until, hold_until)
    s.cap = math.max(s.used, math.min(s.cap, s.good_cap))
    s.probe_cap, s.probe_next, s.probe_gap_s = 0, now + gap_s, gap_s
    return true
  end
  if now < s.hold_until then
    return false
  end
  local new_rate = math.max(rate_min, math.min(rate, s.good_cap) * decrease_factor)
  local good_cap = math.max(1, math.min(s.good_cap, math.floor(new_rate)))
  s.rate, s.rate_ts, s.hold_until = new_rate, hold_until, hold_until
  s.cap = math.max(s.used, math.min(s.cap, good_cap))
  s.good_cap = good_cap
  return true
end

if op == 'throttled' then
  local changed = step_down()
  local window = tonumber(ARGV[13])
  local window_cap = tonumber(ARGV[14])
  if window_cap > 0 and window >= s.tally_win then
    if window == s.tally_win then
      s.tally_n = s.tally_n + 1
    else
      s.tally_win, s.tally_n = window, 1
    end
    s.good_cap = math.max(1, math.min(s.good_cap, window_cap - s.tally_n))
    s.cap = math.max(s.used, math.min(s.cap, s.good_cap))
    if current_rate(s, qps, inc) > s.good_cap then
      -- Recovery climbs from the proven bound; no probe before it has climbed again.
      s.rate, s.rate_ts = s.good_cap, math.max(s.rate_ts, now)
    end
    changed = true
  end
  if changed then
    save()
  end
  return fmt(effective_rate(s, qps, inc, probe_settle_s))
end

return redis.error_reply('ratelimit: unknown operation ' .. tostring(op))
