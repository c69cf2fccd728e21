// The switching loop of the userspace link emulator (edgemoe.cluster.linkem): packets read
// from one descriptor per endpoint (a TUN device; any packet descriptor in tests) are held
// for their links' one-way delays, paced at their rates and written to the endpoint their
// IPv4 destination names. Native so that a packet waits only for its link, not for an
// interpreter: the loop sleeps in epoll on an absolute timerfd (no timer slack) and can read
// while packets are held.
//
//   leaves the sender:   up_free   = max(read time, up_free) + bits / src rate
//   delivered at:        down_free = max(up_free + src delay, down_free) + bits / dst rate
//                        due       = down_free + dst delay
#pragma once

#include <cstdint>
#include <map>
#include <queue>
#include <tuple>
#include <vector>

namespace edgemoe {

struct LinkPort {
  int fd = -1;            // nonblocking, one packet per read/write; owned by the caller
  uint32_t address = 0;   // IPv4, host byte order (10.77.0.1 = 0x0A4D0001)
  double delay_s = 0;     // one way
  double bits_per_s = 0;  // 0: no limit
};

// What crossed the switch from one endpoint to another, split by TCP/UDP port pair.
struct LinkFlow {
  uint32_t src = 0, dst = 0;  // endpoint indices
  uint8_t protocol = 0;       // IP protocol (6 TCP, 17 UDP)
  uint16_t sport = 0, dport = 0;
  uint64_t packets = 0, bytes = 0;
  double queued_s = 0;  // time spent behind earlier packets on the two links (beyond its own delay and size)
};

struct LinkStats {
  std::vector<LinkFlow> flows;
  uint64_t packets = 0, bytes = 0;
  uint64_t dropped = 0;  // not IPv4, or to an address no endpoint has, or a failed write
  // How much later than due a packet's write began: what the emulator adds beyond the link.
  double late_sum_s = 0, late_max_s = 0;
  uint64_t late_over_50us = 0, late_over_200us = 0, late_over_1ms = 0;
  double write_sum_s = 0;  // in write(): the receiving namespace's network stack, run by this thread
  uint64_t wakeups = 0;    // epoll returns
  double seconds = 0;      // switching so far (all run() calls)
};

class LinkSwitch {
 public:
  // spin_s: before a packet is due, poll without sleeping for this long (0: sleep to the due time).
  LinkSwitch(std::vector<LinkPort> ports, double spin_s = 0);
  ~LinkSwitch();
  LinkSwitch(const LinkSwitch&) = delete;
  LinkSwitch& operator=(const LinkSwitch&) = delete;

  enum Stop { kStopped = 0, kReadable = 1 };
  // Switches until stop() (kStopped) or, if watch_fd >= 0, until watch_fd is readable
  // (kReadable; it is not read here: Python's signal wake-up descriptor, for one). Packets
  // held stay held between calls. One thread at a time.
  Stop run(int watch_fd = -1);
  // From any thread: run() returns kStopped (at once, or as soon as it is called).
  void stop();
  // Counters so far; not while run() is running in another thread.
  LinkStats stats() const;

 private:
  struct Held {
    int64_t due_ns;
    uint64_t seq;
    uint32_t dst;
    std::vector<uint8_t> packet;
  };
  struct Later {
    bool operator()(const Held& a, const Held& b) const {
      return a.due_ns != b.due_ns ? a.due_ns > b.due_ns : a.seq > b.seq;
    }
  };
  struct PortState {
    LinkPort link;
    int64_t up_free_ns = 0, down_free_ns = 0;
  };
  using FlowKey = std::tuple<uint32_t, uint32_t, uint8_t, uint16_t, uint16_t>;

  void read_port(uint32_t i, std::vector<uint8_t>& buf);
  void deliver_due(int64_t now);

  std::vector<PortState> ports_;
  int64_t spin_ns_;
  int epoll_ = -1, timer_ = -1, wake_ = -1;
  std::priority_queue<Held, std::vector<Held>, Later> held_;
  uint64_t seq_ = 0;
  std::map<FlowKey, LinkFlow> flows_;
  LinkStats totals_;
};

}  // namespace edgemoe
