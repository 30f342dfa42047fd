# Draws one curve of bench/curves.lua from its CSV (first column: x; every
# other plotted column: one series, titled by its header).
#
#   gnuplot -e "name='keys'; csv='keys.csv'; png='keys.png'" bench/curves.gp
#
# name: keys | values | threads | waiters.
if (!exists("quick")) quick = 0
set terminal pngcairo size 900,560 font "Sans,11" noenhanced
set output png
set datafile separator ","
set key top left box opaque width 1
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set style data linespoints
set pointsize 1.3
note = quick ? " (quick mode: rough numbers)" : ""

if (name eq "keys") {
    set title "Hit latency against the number of keys".note."\nregion:get of a 16-byte string, keys read in uniform random order"
    set xlabel "keys in the cache"
    set ylabel "ns per get (log scale; lower is better)"
    set logscale xy
    set format y "%.0f"
    set format x "1e%L"
    set autoscale xfix
    set offsets graph 0.02, graph 0.02, 0, 0
    # columns 2-4: the stores; 5: the anchor, a plain Lua table (dashed)
    plot for [i=2:4] csv using 1:i lw 2 title columnheader(i), \
         csv using 1:5 lw 2 dt 2 lc rgb "#444444" title columnheader(5)
} else {
if (name eq "values") {
    set title "Hit latency against the value size".note."\nregion:get of a string, 256 keys read in random order"
    set xlabel "value size (bytes, log scale)"
    set ylabel "ns per get (log scale; lower is better)"
    set logscale xy
    set format y "%.0f"
    set autoscale xfix
    set offsets graph 0.02, graph 0.02, 0, 0
    set xtics ("16 B" 16, "256 B" 256, "4 KiB" 4096, "64 KiB" 65536, "1 MiB" 1048576)
    plot for [i=2:4] csv using 1:i lw 2 title columnheader(i)
} else {
if (name eq "threads") {
    set title "shared_memory hit throughput against threads".note."\nC API from pthreads (bench/shm_threads.sh), 10000 keys, 16-byte values"
    set xlabel "threads (2 CPUs)"
    set ylabel "million gets per second, all threads"
    set xrange [0.8:2.2]
    set xtics 1
    set yrange [0:*]
    set offsets 0, 0, graph 0.35, 0
    set key top left
    stats csv skip 1 nooutput
    plot for [i=2:STATS_columns] csv using 1:i lw 2 title columnheader(i)
} else {
if (name eq "waiters") {
    set title "Miss path against concurrent waiters".note."\ntime past the creator until every coroutine has the value (memory region)"
    set xlabel "coroutines waiting on one missing key (log scale)"
    set ylabel "overhead (ms): last waiter's time minus creator time"
    set logscale x
    set autoscale xfix
    set offsets graph 0.02, graph 0.02, graph 0.3, 0
    set yrange [0:*]
    stats csv skip 1 nooutput
    ncreators = (STATS_columns - 1) / 3
    plot for [i=2:1+ncreators] csv using 1:i lw 2 title columnheader(i)
} else {
    print "curves.gp: unknown name ".name
    exit status 1
}}}}
