// Binding of the link emulator's switching loop (linkswitch.h) as _core.LinkSwitch.
#include <arpa/inet.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "linkswitch.h"

namespace edgemoe::python {

namespace {

uint32_t parse_ipv4(const std::string& s) {
  in_addr a{};
  if (inet_pton(AF_INET, s.c_str(), &a) != 1)
    throw std::invalid_argument("link switch: '" + s + "' is not an IPv4 address");
  return ntohl(a.s_addr);
}

}  // namespace

void bind_link(py::module_& m) {
  py::class_<LinkSwitch>(m, "LinkSwitch", R"doc(
The link emulator's switching loop (`python -m edgemoe.cluster.linkem`): every packet read
from a port's descriptor is held for the sender's and the receiver's one-way delays, paced
at their rates, and written to the port whose address is its IPv4 destination.

ports: (fd, "a.b.c.d", one-way delay in s, bits/s or 0 for no limit) per endpoint; the
descriptors (nonblocking, one packet per read and write: TUN devices, packet sockets) stay
the caller's. spin_s: poll without sleeping for this long before a packet is due.)doc")
      .def(py::init([](const std::vector<std::tuple<int, std::string, double, double>>& ports, double spin_s) {
             std::vector<LinkPort> ps;
             for (const auto& [fd, address, delay, bits] : ports) ps.push_back({fd, parse_ipv4(address), delay, bits});
             return new LinkSwitch(std::move(ps), spin_s);
           }),
           py::arg("ports"), py::arg("spin_s") = 0.0)
      .def(
          "run",
          [](LinkSwitch& s, int watch_fd) {
            LinkSwitch::Stop why;
            {
              py::gil_scoped_release release;
              why = s.run(watch_fd);
            }
            return std::string(why == LinkSwitch::kReadable ? "readable" : "stopped");
          },
          py::arg("watch_fd") = -1,
          "Switch until stop() ('stopped') or until watch_fd, if given, is readable ('readable'; not read "
          "here: signal.set_wakeup_fd's descriptor, for one). Packets held stay held for the next run(). "
          "Releases the GIL.")
      .def("stop", &LinkSwitch::stop, "Make run() return 'stopped' (from any thread; at once or when next called).")
      .def(
          "stats",
          [](const LinkSwitch& s) {
            LinkStats st = s.stats();
            py::list flows;
            for (const LinkFlow& f : st.flows) {
              py::dict d;
              d["src"] = f.src;
              d["dst"] = f.dst;
              d["protocol"] = f.protocol;
              d["sport"] = f.sport;
              d["dport"] = f.dport;
              d["packets"] = f.packets;
              d["bytes"] = f.bytes;
              d["queued_s"] = f.queued_s;
              flows.append(d);
            }
            py::dict d;
            d["flows"] = flows;
            d["packets"] = st.packets;
            d["bytes"] = st.bytes;
            d["dropped"] = st.dropped;
            d["late_sum_s"] = st.late_sum_s;
            d["late_max_s"] = st.late_max_s;
            d["late_over_50us"] = st.late_over_50us;
            d["late_over_200us"] = st.late_over_200us;
            d["late_over_1ms"] = st.late_over_1ms;
            d["write_sum_s"] = st.write_sum_s;
            d["wakeups"] = st.wakeups;
            d["seconds"] = st.seconds;
            return d;
          },
          "Counters so far (not while run() is running in another thread): per flow (src and dst port index, "
          "IP protocol, TCP/UDP ports) packets, bytes and queued_s (time behind earlier packets on the links); "
          "totals; late_*: how much later than due each packet's write began (the emulator's own delay); "
          "write_sum_s: time in write() (the receiving stack, run by this thread); wakeups; "
          "seconds switched.");
}

}  // namespace edgemoe::python
