# Draws bench/freshness.lua's XFetch simulation from its CSV: the mean
# cumulative number of requests that waited for a missing or expired value
# (after the first value), and of requests served an expired value, over
# simulated time, with and without early_refresh.
#
#   gnuplot -e "csv='xfetch.csv'; png='xfetch.png'; seeds=40" bench/freshness.gp
if (!exists("quick")) quick = 0
if (!exists("seeds")) seeds = 0
set terminal pngcairo size 900,560 font "Sans,11" noenhanced
set output png
set datafile separator ","
set key top left box opaque width 1
set grid xtics ytics lc rgb "#dddddd"
note = quick ? " (quick mode)" : ""
set title sprintf("early_refresh (XFetch) vs expiry%s\n50 requests/s on one key, creator 100 ms, expiration 2 s; mean of %d runs", note, seeds)
set xlabel "simulated time (s)"
set ylabel "requests, cumulative (mean per run)"
set xrange [0:*]
set yrange [0:*]
plot csv using 1:2 with lines lw 3 lc rgb "#c0392b" title columnheader(2), \
     csv using 1:3 with lines lw 3 lc rgb "#27ae60" title columnheader(3), \
     csv using 1:4 with lines lw 3 dt 2 lc rgb "#2980b9" title columnheader(4), \
     csv using 1:5 with lines lw 1.5 dt 3 lc rgb "#c0392b" title columnheader(5), \
     csv using 1:6 with lines lw 1.5 dt 3 lc rgb "#27ae60" title columnheader(6), \
     csv using 1:7 with lines lw 1.5 dt 4 lc rgb "#2980b9" title columnheader(7)
